"""Reading AUTOMATIC1111's infotext back: `imagine.images.parse_a1111_parameters` (its parse_generation_parameters),
`imagine generate --infotext` (its PNG Info and "Send to txt2img": the run a picture's parameters describe), and the
A1111 API's /sdapi/v1/png-info.

Checked: A1111's own docstring example and its quoting, size and last-line rules read as its reader reads them; the
fields mapped onto the flags as A1111 would run them (its old "DPM++ 2M Karras" names, its "Automatic", its hires
resize form, its default GPU source read as an NVIDIA card's draws); a picture the CLI made under A1111's rules,
with a variation seed, hires. fix, the NV source and an ENSD, made again from its PNG alone bit for bit, flags given
winning over the infotext's; bad input named.
"""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from test_loading import save_diffusers_folder

from imagine.commands.generate import infotext_defaults, parse_sampler_options, record_defaults
from imagine.images import A1111_INFOTEXT_DEFAULTS, a1111_parameters, parse_a1111_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

# the example in A1111's parse_generation_parameters docstring (modules/infotext_utils.py)
A1111_EXAMPLE = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by \
Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, \
mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""


def test_read_as_a1111_reads_it():
    got = parse_a1111_parameters(A1111_EXAMPLE)
    assert got["Prompt"].startswith("girl with an artist's beret") and got["Prompt"].endswith("detailed, intricate")
    assert got["Negative prompt"].startswith("ugly, fat") and got["Negative prompt"].endswith("messy drawing")
    assert {k: got[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size-1", "Size-2", "Model hash")} == {
        "Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512", "Size-2": "512",
        "Model hash": "45dee52b"}
    # a quoted value is JSON (commas and colons inside it kept); a negative prompt may run over several lines
    text = 'a cat\nsecond line\nNegative prompt: blurry,\nlow quality\nSteps: 4, Lora: "a: 0.7, b: 1", Seed: 3'
    got = parse_a1111_parameters(text)
    assert (got["Prompt"], got["Negative prompt"], got["Lora"]) == ("a cat\nsecond line", "blurry,\nlow quality",
                                                                     "a: 0.7, b: 1")
    # a last line of fewer than three fields is part of the prompt (A1111's rule)
    assert parse_a1111_parameters("a cat\nSteps: 4, Seed: 3") == {"Prompt": "a cat\nSteps: 4, Seed: 3",
                                                                  "Negative prompt": ""}
    with_defaults = parse_a1111_parameters(A1111_EXAMPLE, defaults=True)
    assert with_defaults["RNG"] == "GPU" and with_defaults["Clip skip"] == "1" and with_defaults["Seed"] == "965400086"
    assert set(A1111_INFOTEXT_DEFAULTS) <= set(with_defaults)


def test_our_writer_reads_back():
    p = {"prompt": "a red, circle", "negative_prompt": "blurry", "steps": 20, "sampler": "dpmpp_2m",
         "schedule_type": "karras", "guidance_scale": 7.5, "seed": 12, "width": 512, "height": 768, "rng": "nv",
         "noise_seed_delta": 31337, "subseed": 40, "subseed_strength": 0.25, "seed_resize_from": "512x512",
         "hires_scale": 1.5, "hires_steps": 10, "hires_upscaler": "Latent", "strength": 0.6, "clip_skip": 1}
    got = parse_a1111_parameters(a1111_parameters(p))
    assert got["Prompt"] == "a red, circle" and got["Negative prompt"] == "blurry"
    flags = infotext_defaults(got)
    assert {k: flags[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "sigma_schedule", "guidance_scale",
                                  "seed", "width", "height", "rng", "noise_seed_delta", "variation_seed",
                                  "variation_strength", "seed_resize_from", "hires_scale", "hires_steps",
                                  "hires_upscaler", "hires_strength", "clip_skip")} == {
        "prompt": "a red, circle", "negative_prompt": "blurry", "steps": 20, "sampler": "DPM++ 2M",
        # (Karras is DPM++ 2M's "Automatic": read as Automatic, as A1111's reader does, which picks Karras again)
        "sigma_schedule": None, "guidance_scale": 7.5, "seed": 12, "width": 512, "height": 768, "rng": "nv",
        "noise_seed_delta": 31337, "variation_seed": 40, "variation_strength": 0.25, "seed_resize_from": "512x512",
        "hires_scale": 1.5, "hires_steps": 10, "hires_upscaler": "latent", "hires_strength": 0.6, "clip_skip": 1}
    assert flags["a1111_sampling"] and flags["emphasis"] and flags["prompt_editing"]
    assert flags["_infotext_notes"] == []
    # imagine's own record: an inverted mask and an A1111-rule run's schedule naming (None: none written) carried
    record = record_defaults({"mask_invert": True, "a1111_schedule": None, "sampler_options": {"last_step": False},
                              "model": "m.safetensors", "version": "x"}, mask=True)
    assert (record["invert_mask"], record["_a1111_schedule"], record["sampler_option"]) == (True, None,
                                                                                           ["last_step=False"])
    assert record["_infotext_notes"] == ["not applied: model: m.safetensors"]
    assert parse_sampler_options(record["sampler_option"]) == {"last_step": False}
    # the picture's settings apply where the picture (and its mask) are given again; else they are said
    picture = {"resize_mode": "crop_and_resize", "masked_content": "latent_noise", "mask_invert": True, "strength": 0.6}
    assert "resize_mode" not in record_defaults(picture) and "masked_content" not in record_defaults(picture)
    both = record_defaults(picture, init_image=True, mask=True)
    assert (both["resize_mode"], both["masked_content"], both["invert_mask"], both["strength"]) == (
        "crop_and_resize", "latent_noise", True, 0.6)


def test_a1111s_forms_map_onto_the_flags():
    from imagine.samplers import a1111_settings

    old = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE.replace("Euler a", "DPM++ 2M Karras")
                                                   + ", Clip skip: 2, ENSD: 31337, Eta: 0.67, Emphasis: None"))
    assert (old["sampler"], old["sigma_schedule"], old["clip_skip"], old["noise_seed_delta"], old["eta"]) == (
        "DPM++ 2M Karras", None, 1, 31337, 0.67)
    assert old["emphasis"] is False and old["long_prompts"]  # ("None": brackets are text; the rest is still read)
    # no RNG: A1111's default GPU source, read as an NVIDIA card's; the model is said, not applied
    assert old["rng"] == "nv" and any("RNG: GPU" in n for n in old["_infotext_notes"])
    assert any("Model hash: 45dee52b" in n for n in old["_infotext_notes"])
    # A1111's labels for the churn options (sd_samplers_kdiffusion's "Sigma churn"...), and imagine's older ones
    churn = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE.replace("Euler a", "Euler")
                                                     + ", Sigma churn: 1, Sigma noise: 1.003, s_tmin: 0.5"))
    assert parse_sampler_options(churn["sampler_option"]) == {"s_churn": 1.0, "s_noise": 1.003, "s_tmin": 0.5}
    auto = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE + ", Schedule type: Automatic, RNG: CPU"))
    assert auto["sigma_schedule"] is None and auto["rng"] == "cpu"
    ddim = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE.replace("Euler a", "DDIM")
                                                    + ", Schedule type: Karras, Eta DDIM: 0.3"))
    assert ddim["sigma_schedule"] is None and ddim["eta"] == 0.3  # (A1111 runs DDIM on its own timesteps)
    resized = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE + ", Hires resize: 768x768, Denoising "
                                                                       "strength: 0.5, Hires upscaler: R-ESRGAN 4x+"))
    assert (resized["hires_resize"], resized["hires_strength"], resized["hires_upscaler"]) == ("768x768", 0.5,
                                                                                              "lanczos")
    # A1111's "resize to" runs as a size (its calculate_target_resolution, generate_hires(hires_resize)): one side 0
    # and another shape too (since session 27; they were read as a scale, or said and not applied)
    for size in ("0x768", "768x1024"):
        read = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE + f", Hires resize: {size}"))
        assert read["hires_resize"] == size and "hires_scale" not in read
        assert not any("Hires resize" in n for n in read["_infotext_notes"])
    # A1111 1.6-1.8's schedule in the sampler's name; its Latent upscalers' variants run as they are (since session
    # 27); "No norm" run as its mode
    named = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE.replace("Euler a", "DPM++ 2M SDE Exponential")
                                                     + ", Hires upscale: 2, Hires upscaler: Latent (nearest), "
                                                       "Emphasis: No norm"))
    assert (named["sampler"], named["sigma_schedule"], named["hires_upscaler"]) == ("DPM++ 2M SDE", None,
                                                                                    "latent_nearest")
    assert a1111_settings(named["sampler"])["sigma_schedule"] == "exponential"  # (its Automatic: read as such)
    heun = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE.replace("Euler a", "Heun")
                                                    + ", Schedule type: Exponential"))
    assert heun["sigma_schedule"] == "exponential"  # (not Heun's Automatic: kept)
    assert not any("Latent (nearest)" in n for n in named["_infotext_notes"])
    # (since session 28 "No norm" runs as A1111's mode, not read as Original with a note)
    assert named["emphasis"] == "No norm" and not any("Emphasis" in n for n in named["_infotext_notes"])
    # a long quoted value (a hires prompt of thousands of characters, commas and "Label: value" inside) stays one value
    long = "(masterpiece:1.2), Steps: 99, " * 200
    got = parse_a1111_parameters(A1111_EXAMPLE + ", Hires prompt: " + __import__("json").dumps(long) + ", ENSD: 1")
    assert (got["Hires prompt"], got["Steps"], got["ENSD"]) == (long, "20", "1")
    with pytest.raises(ValueError, match="up to 65536 are read"):
        parse_a1111_parameters("p\n" + "word " * 20000)
    img2img = infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE + ", Denoising strength: 0.4"), init_image=True)
    assert img2img["strength"] == 0.4 and "hires_scale" not in img2img
    with pytest.raises(ValueError, match="Steps 'many' is not a whole number"):
        infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE.replace("Steps: 20", "Steps: many")))
    with pytest.raises(ValueError, match="RNG 'cuda' is not one of A1111's sources GPU, CPU, NV"):
        infotext_defaults(parse_a1111_parameters(A1111_EXAMPLE + ", RNG: cuda"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "folder"
    save_diffusers_folder(folder, "sd1", scheduler="ddim")
    return folder


def _run(args, capsys):
    from imagine.cli import main

    code = main(["generate", *map(str, args)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.err


def test_a_picture_is_made_again_from_its_png(model, tmp_path, capsys):
    first = tmp_path / "first.png"
    _run(["--model", model, "a (red:1.2) circle", "-n", "blurry", "--seed", 5, "--steps", 3, "--sampler", "Euler a",
          "--a1111-sampling", "--a1111-prompts", "--guidance-scale", 6, "--height", 16, "--width", 16,
          "--variation-seed", 40, "--variation-strength", 0.3, "--rng", "nv", "--ensd", 31337, "--hires-scale", 1.5,
          "--hires-strength", 0.6, "-o", first, "-q"], capsys)
    again = tmp_path / "again.png"
    err = _run(["--model", model, "--infotext", first, "-o", again], capsys)
    # (imagine's own record, the whole run, is what is read; the model it names is the one loaded again: no note)
    assert "not applied" not in err
    a, b = Image.open(first), Image.open(again)
    assert b.size == (24, 24) and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
    assert a.text["parameters"] == b.text["parameters"]
    # a text file with the infotext does the same; a flag given wins over the infotext's value
    text = tmp_path / "params.txt"
    text.write_text(a.text["parameters"], encoding="utf-8")
    other = tmp_path / "other.png"
    _run(["--model", model, "--infotext", text, "--seed", 6, "-o", other, "-q"], capsys)
    # --from-file gives the prompts (the picture's prompt is not one given)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square\n", encoding="utf-8")
    _run(["--model", model, "--infotext", text, "--from-file", prompts, "-o", tmp_path / "many", "-q"], capsys)
    made = sorted((tmp_path / "many").glob("*.png"))
    assert len(made) == 1 and Image.open(made[0]).text["parameters"].startswith("a blue square\n")
    c = Image.open(other)
    assert "Seed: 6" in c.text["parameters"] and c.convert("RGB").tobytes() != a.convert("RGB").tobytes()
    assert c.text["parameters"] == a.text["parameters"].replace("Seed: 5", "Seed: 6")


@pytest.mark.parametrize("extra", [
    ["a (red:1.5) circle, ((blue))", "--sampler", "Euler"],  # (A1111's rules without its prompt syntax)
    ["a circle", "--sampler", "Euler a", "--guidance-rescale", "0.7"],  # (no infotext field for it)
    ["a circle", "--sampler", "DDIM", "--schedule-type", "karras"],  # (A1111 would not apply it; imagine did)
    ["a circle", "--sampler", "UniPC"],  # (A1111's UniPC: its own options, among them booleans)
])
def test_an_a1111_rule_picture_is_made_again_from_its_record(model, tmp_path, capsys, extra):
    """A PNG made under --a1111-sampling carries more than its infotext says: its record makes it again, bit for bit,
    with the same infotext."""
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    _run(["--model", model, *extra, "--a1111-sampling", "--seed", 3, "--steps", 4, "--height", 16, "--width", 16,
          "-o", first, "-q"], capsys)
    _run(["--model", model, "--infotext", first, "-o", again, "-q"], capsys)
    a, b = Image.open(first), Image.open(again)
    assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()
    assert a.text["parameters"] == b.text["parameters"] and a.text["imagine"] == b.text["imagine"]


def test_an_imagine_picture_made_diffusers_way_is_made_again_from_its_record(model, tmp_path, capsys):
    """A PNG imagine made without A1111's rules carries its own record (the "imagine" chunk): --infotext runs that
    record, diffusers' way, to the same bytes; its eta is recorded (A1111's "Eta" / "Eta DDIM")."""
    first = tmp_path / "first.png"
    _run(["--model", model, "a (red:1.2) circle", "-n", "blurry", "--seed", 5, "--steps", 3, "--sampler", "euler_a",
          "--schedule-type", "karras", "--emphasis", "--eta", 0.7, "--guidance-scale", 6, "--height", 16, "--width",
          16, "--variation-seed", 40, "--variation-strength", 0.3, "--rng", "nv", "--ensd", 7, "--hires-scale", 1.5,
          "--hires-upscaler", "lanczos", "--hires-strength", 0.6, "-o", first, "-q"], capsys)
    a = Image.open(first)
    assert "Eta: 0.7" in a.text["parameters"] and "Schedule type: Karras" in a.text["parameters"]
    again = tmp_path / "again.png"
    err = _run(["--model", model, "--infotext", first, "-o", again], capsys)
    assert "not applied" not in err  # (the model it names is the one loaded again)
    b = Image.open(again)
    assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes() and a.text["imagine"] == b.text["imagine"]
    # the same picture replayed as A1111 would run its infotext (its levels, its start) is another picture
    text = tmp_path / "params.txt"
    text.write_text(a.text["parameters"], encoding="utf-8")
    other = tmp_path / "other.png"
    _run(["--model", model, "--infotext", text, "-o", other, "-q"], capsys)
    assert Image.open(other).convert("RGB").tobytes() != a.convert("RGB").tobytes()
    churned, replayed = tmp_path / "churned.png", tmp_path / "replayed.png"
    _run(["--model", model, "a circle", "--steps", 3, "--sampler", "euler", "--sampler-option", "s_churn=1", "--height",
          16, "--width", 16, "-o", churned, "-q"], capsys)
    _run(["--model", model, "--infotext", churned, "-o", replayed, "-q"], capsys)
    assert Image.open(churned).tobytes() == Image.open(replayed).tobytes()
    ddim = tmp_path / "ddim.png"
    _run(["--model", model, "a circle", "--steps", 2, "--sampler", "ddim", "--eta", 0.5, "--height", 16, "--width", 16,
          "-o", ddim, "-q"], capsys)
    assert "Eta DDIM: 0.5" in Image.open(ddim).text["parameters"]


def test_a_text_chunk_after_the_pixels_is_read(tmp_path):
    """A PNG whose parameters chunk comes after its pixel data (Pillow, A1111 and ComfyUI write it before) is read
    from a file too."""
    import struct
    import zlib

    from imagine.images import read_infotext

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    data = buf.getvalue()
    body = b"parameters\0" + A1111_EXAMPLE.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    end = data.rindex(b"IEND") - 4
    path = tmp_path / "late.png"
    path.write_bytes(data[:end] + chunk + data[end:])
    assert read_infotext(path) == A1111_EXAMPLE


def test_bad_infotexts_are_named(model, tmp_path, capsys):
    from imagine.cli import main

    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    for source, says in ((bare, "carries no parameters text"), (tmp_path / "absent.png", "no such file")):
        assert main(["generate", "--model", str(model), "--infotext", str(source)]) == 2
        assert says in capsys.readouterr().err


def test_png_info_answers_as_a1111(model, tmp_path):
    httpx = pytest.importorskip("httpx")
    from imagine.pipelines.text_to_image import TextToImagePipeline
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    pipe = TextToImagePipeline.from_pretrained(model)
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": "a red circle", "steps": 2, "width": 16, "height": 16, "seed": 5, "sampler_name": "Euler"}
        made = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120).json()
        r = httpx.post(f"{srv.url}/sdapi/v1/png-info", json={"image": "data:image/png;base64," + made["images"][0]},
                       timeout=30)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["info"] == __import__("json").loads(made["info"])["infotexts"][0]
        p = got["parameters"]
        assert (p["Prompt"], p["Seed"], p["Sampler"], p["Size-1"], p["RNG"], p["Schedule type"]) == (
            "a red circle", "5", "Euler", "16", "CPU", "Automatic")
        # the churn sent is in the infotext under A1111's labels
        made = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "s_churn": 1, "s_noise": 1.003},
                          timeout=120).json()
        assert "Sigma churn: 1, Sigma noise: 1.003" in __import__("json").loads(made["info"])["infotexts"][0]
        # the eta sent is in the infotext where the sampler takes one (A1111's "Eta"), not where it is unused
        for sampler, written in (("Euler a", True), ("Euler", False)):
            made = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "sampler_name": sampler, "eta": 0.5},
                              timeout=120).json()
            assert ("Eta: 0.5" in __import__("json").loads(made["info"])["infotexts"][0]) == written, sampler
        plain = io.BytesIO()
        Image.new("RGB", (4, 4)).save(plain, format="PNG")
        r = httpx.post(f"{srv.url}/sdapi/v1/png-info", json={"image": base64.b64encode(plain.getvalue()).decode()},
                       timeout=30)
        assert r.json()["info"] == "" and r.json()["parameters"]["RNG"] == "GPU"
        assert httpx.post(f"{srv.url}/sdapi/v1/png-info", json={"image": ""}, timeout=30).json()["info"] == ""
        # A1111's JPEG and WebP infotexts: the EXIF UserComment, "UNICODE\0" and UTF-16
        for fmt in ("JPEG", "WEBP"):
            exif = Image.Exif()
            exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + A1111_EXAMPLE.encode("utf-16-be")
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, format=fmt, exif=exif.tobytes())
            r = httpx.post(f"{srv.url}/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()},
                           timeout=30)
            assert r.json()["info"] == A1111_EXAMPLE and r.json()["parameters"]["Seed"] == "965400086", fmt
        r = httpx.post(f"{srv.url}/sdapi/v1/png-info", json={"image": "bm90IGEgcGljdHVyZQ=="}, timeout=30)
        assert r.status_code == 422 and "not a base64 image" in r.text
