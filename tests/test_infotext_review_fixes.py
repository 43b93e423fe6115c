"""Infotexts read as AUTOMATIC1111 1.10 reads them, after a review: its reader (parse_generation_parameters with its
restore_old_hires_fix_params and prompt_parser.parse_prompt_attention, read_info_from_image with piexif's
UserComment.load) restated below, at its options' defaults, is the truth each case is held against.

Checked: "Negative prompt:" alone on its line; an empty field value; the old hires. fix's "First pass size"; the
defaults it derives (a Hypernet's tag, "Cache FP16 weight for LoRA", "Emphasis"); a UTF-16 EXIF UserComment in
A1111's big-endian (a Japanese prompt), with a byte-order mark, little-endian Latin text, no known prefix; the EXIF
winning over a PNG's chunk, a GIF's and JPEG's comment; "Clip skip" said, not applied, on SD 2.x and SDXL models (A1111
ignores it there); the U-Net's dropout in its residual blocks only, as diffusers'.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re

import pytest
import torch
from PIL import Image, PngImagePlugin

from imagine.commands.generate import add_arguments, defaults_from, infotext_defaults
from imagine.images import a1111_parameters, parse_a1111_parameters, picture_infotext

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------------------------------
# AUTOMATIC1111 1.10, restated (modules/infotext_utils.py, prompt_parser.py, processing.py, images.py; piexif.helper)
re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
re_imagesize = re.compile(r"^(\d+)x(\d+)$")
re_attention = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_prompt_attention(text):
    res, round_brackets, square_brackets = [], [], []

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text, weight = m.group(0), m.group(1)
        if text.startswith('\\'):
            res.append([text[1:], 1.0])
        elif text == '(':
            round_brackets.append(len(res))
        elif text == '[':
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ')' and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == ']' and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(re_break, text)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def old_hires_fix_first_pass_dimensions(width, height):
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def restore_old_hires_fix_params(res, use_old_hires_fix_width_height=False):
    firstpass_width = res.get('First pass size-1', None)
    firstpass_height = res.get('First pass size-2', None)
    if use_old_hires_fix_width_height:
        hires_width = int(res.get("Hires resize-1", 0))
        hires_height = int(res.get("Hires resize-2", 0))
        if hires_width and hires_height:
            res['Size-1'] = hires_width
            res['Size-2'] = hires_height
            return
    if firstpass_width is None or firstpass_height is None:
        return
    firstpass_width, firstpass_height = int(firstpass_width), int(firstpass_height)
    width = int(res.get("Size-1", 512))
    height = int(res.get("Size-2", 512))
    if firstpass_width == 0 or firstpass_height == 0:
        firstpass_width, firstpass_height = old_hires_fix_first_pass_dimensions(width, height)
    res['Size-1'] = firstpass_width
    res['Size-2'] = firstpass_height
    res['Hires resize-1'] = width
    res['Hires resize-2'] = height


def parse_generation_parameters(x):
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ''
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"] = m.group(1)
                res[f"{k}-2"] = m.group(2)
            else:
                res[k] = v
        except Exception:
            pass  # (A1111 prints "Error parsing" and goes on)
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    if "Clip skip" not in res:
        res["Clip skip"] = "1"
    hypernet = res.get("Hypernet", None)
    if hypernet is not None:
        res["Prompt"] += f"""<hypernet:{hypernet}:{res.get("Hypernet strength", "1.0")}>"""
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    for k, v in {"Hires sampler": "Use same sampler", "Hires schedule type": "Use same scheduler",
                 "Hires checkpoint": "Use same checkpoint", "Hires prompt": "", "Hires negative prompt": "",
                 "Mask mode": "Inpaint masked", "Masked content": "original", "Inpaint area": "Whole picture",
                 "Masked area padding": 32}.items():
        res.setdefault(k, v)
    restore_old_hires_fix_params(res)
    for k, v in {"RNG": "GPU", "Schedule type": "Automatic", "Schedule max sigma": 0, "Schedule min sigma": 0,
                 "Schedule rho": 0, "VAE Encoder": "Full", "VAE Decoder": "Full", "FP8 weight": "Disable"}.items():
        res.setdefault(k, v)
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False
    prompt_attention = parse_prompt_attention(prompt)
    prompt_attention += parse_prompt_attention(negative_prompt)
    prompt_uses_emphasis = len(prompt_attention) != len([p for p in prompt_attention if p[1] == 1.0 or p[0] == 'BREAK'])
    if "Emphasis" not in res and prompt_uses_emphasis:
        res["Emphasis"] = "Original"
    if "Refiner switch by sampling steps" not in res:
        res["Refiner switch by sampling steps"] = False
    return res


def user_comment_load(data):  # piexif.helper.UserComment.load
    if len(data) < 8:
        raise ValueError('not enough data to decode UserComment')
    prefix, body = data[:8], data[8:]
    if prefix == b"\0" * 8:
        raise ValueError('prefix is UNDEFINED, unable to decode UserComment')
    try:
        encoding = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"UNICODE\0": "utf_16_be"}[prefix]
    except KeyError:
        raise ValueError('unable to determine appropriate encoding')
    return body.decode(encoding, errors='replace')


def read_info_from_image(image):  # (piexif.load of the EXIF block: Pillow's reading of it here)
    items = (image.info or {}).copy()
    geninfo = items.pop('parameters', None)
    if "exif" in items:
        exif = Image.Exif()
        exif.load(items["exif"])
        exif_comment = exif.get_ifd(0x8769).get(0x9286, b'')
        try:
            exif_comment = user_comment_load(exif_comment)
        except ValueError:
            exif_comment = exif_comment.decode('utf8', errors="ignore")
        if exif_comment:
            geninfo = exif_comment
    elif "comment" in items:
        if isinstance(items["comment"], bytes):
            geninfo = items["comment"].decode('utf8', errors="ignore")
        else:
            geninfo = items["comment"]
    return geninfo
# ---------------------------------------------------------------------------------------------------------------------

FIELDS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"


def _as_a1111_reads(text):
    """parse_a1111_parameters(text, defaults=True) against A1111's reading, on every key A1111 gives."""
    truth, ours = parse_generation_parameters(text), parse_a1111_parameters(text, defaults=True)
    assert {k: ours.get(k, "<absent>") for k in truth} == truth
    return ours


@pytest.mark.parametrize("text", [
    f"a cat\nNegative prompt:\nugly\nblurry\n{FIELDS}",
    f"\n\na cat\n\nsecond\nNegative prompt:\n\nugly\n{FIELDS}",
    f"Negative prompt: ugly\n{FIELDS}",
])
def test_prompt_lines_join_as_a1111_joins_them(text):
    ours = _as_a1111_reads(text)
    assert not ours["Negative prompt"].startswith("\n") and not ours["Prompt"].startswith("\n")


def test_the_writer_round_trips_a_negative_prompt_with_line_breaks():
    p = {"prompt": "a cat\n\non a mat", "negative_prompt": "ugly\nblurry\n\nlow quality", "steps": 20,
         "sampler": "euler_a", "guidance_scale": 7.0, "seed": 1, "width": 512, "height": 512}
    text = a1111_parameters(p)
    for read in (parse_generation_parameters(text), parse_a1111_parameters(text)):
        assert (read["Prompt"], read["Negative prompt"]) == (p["prompt"], p["negative_prompt"])
    # a leading line break cannot be written (A1111's writer loses it too): read as A1111 reads it
    text = a1111_parameters({**p, "negative_prompt": "\nugly"})
    assert parse_a1111_parameters(text)["Negative prompt"] == parse_generation_parameters(text)["Negative prompt"] == \
        "ugly"


def test_an_empty_value_is_skipped_and_its_default_applies():
    ours = _as_a1111_reads("a cat\nSteps: 20, Sampler: Euler a, RNG: , Seed: 1")
    assert ours["RNG"] == "GPU" and "RNG" not in parse_a1111_parameters("a cat\nSteps: 20, RNG: , Seed: 1, ENSD: 3")
    flags = infotext_defaults(parse_a1111_parameters("a cat\nSteps: 20, Sampler: Euler a, RNG: , Seed: 1"))
    assert flags["rng"] == "nv"  # (A1111's default GPU source, not an error)


@pytest.mark.parametrize("size", ["Size: 1024x768, ", "Size: 1024x1024, ", "Size: 640x384, ", ""])
@pytest.mark.parametrize("first", ["0x0", "512x512", "0x512"])
def test_the_old_hires_fix_is_read_as_a1111_1_10_reads_it(size, first):
    text = f"a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, {size}Denoising strength: 0.7, " \
           f"First pass size: {first}"
    ours = _as_a1111_reads(text)
    plain = parse_a1111_parameters(text)  # (on every read, as A1111's: not only with its defaults)
    assert {k: plain[k] for k in ("Size-1", "Size-2", "Hires resize-1", "Hires resize-2")} == {
        k: ours[k] for k in ("Size-1", "Size-2", "Hires resize-1", "Hires resize-2")}


def test_the_old_hires_fix_runs_as_a1111_runs_it():
    from imagine.images import restore_old_hires_fix

    text = f"a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x1024, Denoising strength: 0.7, " \
           "First pass size: 512x512"
    flags = infotext_defaults(parse_a1111_parameters(text))
    assert (flags["width"], flags["height"], flags["hires_resize"], flags["hires_strength"]) == (512, 512, "1024x1024",
                                                                                                0.7)
    assert not any("First pass size" in n for n in flags["_infotext_notes"])
    # A1111's use_old_hires_fix_width_height option (off by default): "Hires resize" is then the picture's size
    for fields in ({"Size-1": "512", "Size-2": "512", "Hires resize-1": "1024", "Hires resize-2": "768"},
                   {"Size-1": "512", "Size-2": "512", "First pass size-1": "0", "First pass size-2": "0",
                    "Hires resize-1": 0, "Hires resize-2": 0}):
        truth, ours = dict(fields), dict(fields)
        restore_old_hires_fix_params(truth, use_old_hires_fix_width_height=True)
        restore_old_hires_fix(ours, old_width_height=True)
        assert ours == truth
    with pytest.raises(ValueError, match="First pass size: 0x0 with Size: 0x0"):
        parse_a1111_parameters("a\nSteps: 20, Size: 0x0, First pass size: 0x0")


@pytest.mark.parametrize("extra", [", Hypernet: anime, Hypernet strength: 0.5", ", Hypernet: anime(v2)",
                                   ", FP8 weight: Enable for SDXL", ", FP8 weight: Disable",
                                   ", FP8 weight: Enable, Cache FP16 weight for LoRA: True"])
def test_the_defaults_a1111_derives_from_other_fields(extra):
    _as_a1111_reads(f"a cat\n{FIELDS}{extra}")


@pytest.mark.parametrize("prompt,negative", [
    ("a cat, (dog:1.2)", ""), ("a [cat]", ""), ("a cat", "(ugly)"), ("a (cat:1.0)", ""), ("a cat BREAK a dog", ""),
    (r"a \(cat\)", ""), ("a ((cat)) [[dog]]", ""), ("(a cat", ""), ("a cat", "")])
def test_emphasis_original_where_a1111_finds_it(prompt, negative):
    """(Not checked: a bracketed BREAK alone, "(BREAK)", where A1111's parser weights the empty pieces around it and
    so finds emphasis; imagine's reading of weights, imagine.emphasis, has no empty pieces)"""
    text = f"{prompt}\n" + (f"Negative prompt: {negative}\n" if negative else "") + FIELDS
    _as_a1111_reads(text)
    _as_a1111_reads(text + ", Emphasis: None")  # (written: kept)


# ---------------------------------------------------------------------------------------------------------------------
# pictures: EXIF UserComments (written with Pillow), PNG chunks, comments

JAPANESE = "　".join(["少女", "青い目", "長い髪", "制服", "桜", "春", "笑顔", "教室", "窓", "光"] * 9) + \
    "\nNegative prompt: 低品質　ぼやけ\n" + FIELDS


def _picture(fmt="JPEG", user_comment: bytes | None = None, parameters: str | None = None, **save):
    buf = io.BytesIO()
    if user_comment is not None:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = user_comment
        save["exif"] = exif.tobytes()
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
        save["pnginfo"] = info
    Image.new("RGB" if fmt != "GIF" else "P", (8, 8)).save(buf, format=fmt, **save)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_a1111s_big_endian_user_comment_is_read_whatever_the_prompt(fmt):
    for text in (JAPANESE, "猫　" * 3, "a cat\n" + FIELDS):
        img = _picture(fmt, b"UNICODE\0" + text.encode("utf-16-be"))
        assert picture_infotext(img) == read_info_from_image(img) == text


def test_other_user_comments():
    text = "a cat\n" + FIELDS
    # little-endian where a byte-order mark says so, or Latin text's zero bytes all sit at odd offsets (A1111 reads
    # garbage in both: no A1111 picture is so written)
    assert picture_infotext(_picture(user_comment=b"UNICODE\0\xff\xfe" + JAPANESE.encode("utf-16-le"))) == JAPANESE
    assert picture_infotext(_picture(user_comment=b"UNICODE\0\xfe\xff" + JAPANESE.encode("utf-16-be"))) == JAPANESE
    assert picture_infotext(_picture(user_comment=b"UNICODE\0" + text.encode("utf-16-le"))) == text
    # no known prefix: UTF-8, errors ignored, as A1111 reads it
    for raw in (text.encode(), (text + " 猫").encode() + b"\xff"):
        img = _picture(user_comment=raw)
        assert picture_infotext(img) == read_info_from_image(img) == raw.decode("utf-8", "ignore")
    img = _picture(user_comment=b"ASCII\0\0\0" + text.encode())
    assert picture_infotext(img) == read_info_from_image(img) == text
    assert picture_infotext(_picture(user_comment=b"\0" * 8 + text.encode())) == text  # (its NUL code taken off)


def test_which_text_a_picture_gives_as_a1111_picks_it():
    exif_text, png_text = "exif text\n" + FIELDS, "png text\n" + FIELDS
    cases = [
        _picture("PNG", b"UNICODE\0" + exif_text.encode("utf-16-be"), png_text),  # the EXIF's wins
        _picture("PNG", b"", png_text),  # (an empty comment: the chunk's)
        _picture("PNG", parameters=png_text),
        _picture("GIF", comment=b"a cat\n" + FIELDS.encode()),  # a GIF's comment
        _picture("JPEG", comment=b"a cat\n" + FIELDS.encode()),  # a JPEG's comment
        _picture("JPEG", b"UNICODE\0" + exif_text.encode("utf-16-be"), comment=b"other"),  # EXIF first
        _picture("JPEG"),
    ]
    for img in cases:
        img.load()
        assert picture_infotext(img) == read_info_from_image(img), img.format
    assert picture_infotext(cases[0]) == exif_text and picture_infotext(cases[3]) == "a cat\n" + FIELDS
    assert picture_infotext(cases[-1]) is None


# ---------------------------------------------------------------------------------------------------------------------
# "Clip skip", which A1111 writes whatever the model and reads on SD 1.x alone

CLIP_SKIP = f"a castle\n{FIELDS}, Clip skip: 2"


def test_clip_skip_is_said_not_applied_where_a1111_ignores_it():
    for family, applied in (("openclip", False), ("sdxl", False), ("clip", True), (None, True)):
        flags = infotext_defaults(parse_a1111_parameters(CLIP_SKIP), text_encoder=family)
        assert ("clip_skip" in flags) == applied, family
        assert any(n.startswith("Clip skip: 2 (not applied") for n in flags["_infotext_notes"]) != applied, family


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from safetensors.torch import save_file
    from test_loading import save_diffusers_folder, write_single_file

    root = tmp_path_factory.mktemp("models")
    out = {}
    for kind in ("sd1", "sd2"):
        save_diffusers_folder(root / f"{kind}-folder", kind)
        write_single_file(root / kind / f"{kind}.safetensors", kind, tokenizer_next_to_it=False)
        write_single_file(root / kind / f"{kind}.ckpt", kind, fmt="ckpt", tokenizer_next_to_it=False)
        out[kind] = [root / f"{kind}-folder", root / kind / f"{kind}.safetensors", root / kind / f"{kind}.ckpt"]
    # SDXL's as its files name it (what is read of them: the folder's index, the file's weights' names)
    (root / "sdxl-folder").mkdir()
    (root / "sdxl-folder" / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "conditioner.embedders.1.model.ln_final.weight": torch.ones(4)}, str(root / "sdxl.safetensors"))
    out["sdxl"] = [root / "sdxl-folder", root / "sdxl.safetensors"]
    return out


def test_the_cli_reads_the_models_text_encoder(models, tmp_path):
    from imagine.models.text_encoders import text_encoder_family

    infotext = tmp_path / "infotext.txt"
    infotext.write_text(CLIP_SKIP)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for kind, family in (("sd1", "clip"), ("sd2", "openclip"), ("sdxl", "sdxl")):
        for model in models[kind]:
            assert text_encoder_family(model) == family, model
            flags = defaults_from(parser.parse_args(["--model", str(model), "--infotext", str(infotext)]))
            assert flags.get("clip_skip") == (1 if kind == "sd1" else None), model
    assert text_encoder_family(tmp_path / "infotext.txt") is None and text_encoder_family(None) is None


# ---------------------------------------------------------------------------------------------------------------------

def test_unet_dropout_is_the_residual_blocks_alone_as_in_diffusers():
    diffusers = pytest.importorskip("diffusers")
    from imagine.models.unet import UNet2DConditionModel

    cfg = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
               cross_attention_dim=24, norm_num_groups=8, dropout=0.1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**cfg)
    ours = UNet2DConditionModel(dict(ref.config))
    ours.load_state_dict(ref.state_dict())

    def dropouts(model):
        return {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0}

    assert dropouts(ours) == dropouts(ref) and all("resnets" in name for name in dropouts(ours))
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    ref.train(), ours.train()
    with torch.no_grad():  # (the same draws in the same modules: the same picture)
        torch.manual_seed(3)
        want = ref(x, 10, context).sample
        torch.manual_seed(3)
        got = ours(x, 10, context=context)
    assert torch.equal(got, want)
