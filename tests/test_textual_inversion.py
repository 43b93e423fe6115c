"""Textual-inversion embeddings (Gal et al. 2022): the files of AUTOMATIC1111 and diffusers give the text
encoder the new word as diffusers' own `load_textual_inversion` does on the same weights (the states of a
prompt that uses it, to 1e-4; the 20-step image, to 50 dB), multi-vector words included; the file's
name is the word where the file names none, as in AUTOMATIC1111."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_loading import TEXT_WIDTH, rel_err, save_diffusers_folder, write_single_file  # noqa: E402
from test_sd_parity import NEGATIVE, SEED, SIZE, STEPS, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402

from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _vectors(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, TEXT_WIDTH, generator=torch.Generator().manual_seed(seed))


def _write(layout: str, vectors: torch.Tensor, folder, word: str):
    """An embedding file as each tool saves one; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "a1111.pt":
        path = folder / f"{word}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": word, "step": 3000,
                    "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, path)
    elif layout == "a1111.safetensors":
        path = folder / f"{word}.safetensors"
        save_file({"emb_params": vectors.contiguous()}, str(path))
    elif layout == "diffusers.safetensors":
        path = folder / "learned_embeds.safetensors"
        save_file({word: vectors.contiguous()}, str(path))
    elif layout == "diffusers.bin":
        path = folder / "learned_embeds.bin"
        torch.save({word: vectors}, path)
    else:
        raise AssertionError(layout)
    return path


CASES = [("a1111.pt", "easyneg", 3), ("a1111.safetensors", "sketchy", 2), ("diffusers.safetensors", "<cat-toy>", 1),
         ("diffusers.bin", "<style>", 4)]


@pytest.mark.parametrize("layout,word,n", CASES)
def test_embedding_reads_as_diffusers_reads_it(tmp_path, layout, word, n):
    ref = save_diffusers_folder(tmp_path / "folder", "sd1")
    path = _write(layout, _vectors(n), tmp_path / "emb", word)
    ref.load_textual_inversion(str(path), token=word)
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    assert ours.load_embedding(path) == [word] + [f"{word}_{i}" for i in range(1, n)]
    prompts = [f"a red circle, {word}", f"{word} the blue square {word}"]
    want_ids = ref.tokenizer([ref.maybe_convert_prompt(p, ref.tokenizer) for p in prompts], padding="max_length",
                             max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.text_encoder.tokenize(prompts)["input_ids"], want_ids)
    with torch.no_grad():
        want = ref.text_encoder(want_ids).last_hidden_state
        got = ours.text_encoder.encode(prompts).states
        assert rel_err(got, want) < 1e-4
        plain = TextToImagePipeline.from_pretrained(tmp_path / "folder")
        assert rel_err(plain.text_encoder.encode([f"a red circle, {word}"]).states, want[:1]) > 1e-2  # it matters


def test_generation_with_an_embedding_in_the_negative_prompt_matches_diffusers(tmp_path):
    """AUTOMATIC1111's common use: a negative embedding, from an original single file."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    single = tmp_path / "single" / "model.safetensors"
    write_single_file(single, "sd1")
    path = _write("a1111.safetensors", _vectors(2, seed=4) * 3, tmp_path / "emb", "badhands")
    ref.load_textual_inversion(str(path), token="badhands")
    with torch.no_grad():
        want = ref("a red circle left of the blue square", negative_prompt=f"{NEGATIVE}, badhands", height=SIZE,
                   width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(SEED), output_type="pt").images[0].float()
    ours = TextToImagePipeline.from_pretrained(single, embeddings=[path])
    res = ours.generate("a red circle left of the blue square", f"{NEGATIVE}, badhands", steps=STEPS,
                        guidance_scale=7.5, sampler="ddim", seed=SEED, height=SIZE, width=SIZE, progress=False,
                        output_type="latent")
    got = ((ours.decode(res.latents)[0] + 1) / 2).clamp(0, 1).float()
    assert psnr(got, want) >= 50


def test_generate_cli_takes_embeddings(tmp_path, capsys):
    from imagine.cli import main

    single = tmp_path / "single" / "tiny-sd.safetensors"
    write_single_file(single, "sd1")
    path = _write("diffusers.bin", _vectors(2), tmp_path / "emb", "<style>")
    outs = []
    for extra, prompt in (([], "a red circle"), (["--embedding", f"{path}:mystyle"], "a red circle, mystyle")):
        out = tmp_path / f"x{len(extra)}.png"
        assert main(["generate", "--model", str(single), *extra, prompt, "--steps", "2", "--seed", "3",
                     "--height", "32", "--width", "32", "-o", str(out), "-q"]) == 0
        outs.append(Image.open(out))
    assert outs[0].tobytes() != outs[1].tobytes()
    assert json.loads(outs[1].text["imagine"])["prompt"] == "a red circle, mystyle"


def test_bad_embeddings_get_clear_errors(tmp_path):
    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="embedding not found"):
        pipe.load_embedding(tmp_path / "missing.pt")
    wide = _write("a1111.safetensors", torch.zeros(1, 1024), tmp_path / "w", "wide")
    with pytest.raises(ValueError, match="1024 wide.*takes 64"):
        pipe.load_embedding(wide)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(sdxl))
    with pytest.raises(ValueError, match="SDXL"):
        pipe.load_embedding(sdxl)
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a textual-inversion embedding"):
        pipe.load_embedding(other)
    ok = _write("a1111.safetensors", _vectors(1), tmp_path / "ok", "fine")
    with pytest.raises(ValueError, match="already has the token 'red"):
        pipe.load_embedding(ok, token="red</w>")
    pipe.load_embedding(ok)
    with pytest.raises(ValueError, match="already has the token 'fine'"):
        pipe.load_embedding(ok)  # twice: the word is taken


def test_server_lists_the_loaded_embeddings(tmp_path):
    httpx = pytest.importorskip("httpx")
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    single = tmp_path / "single" / "tiny-sd.safetensors"
    write_single_file(single, "sd1")
    path = _write("a1111.pt", _vectors(3), tmp_path / "emb", "easyneg")
    pipe = TextToImagePipeline.from_pretrained(single, embeddings=[path])
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        loaded = httpx.get(f"{srv.url}/sdapi/v1/embeddings").json()["loaded"]
    assert list(loaded) == ["easyneg"] and loaded["easyneg"]["vectors"] == 3 and loaded["easyneg"]["shape"] == 64


def test_a_capitalised_word_reads_all_its_vectors(tmp_path):
    """AUTOMATIC1111's files are named like EasyNegative; CLIP lower-cases the prompt, and the word must still be
    read as all of its vectors, in any case and inside emphasis."""
    save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    path = _write("a1111.safetensors", _vectors(2), tmp_path / "emb", "EasyNegative")
    tokens = pipe.load_embedding(path)
    ids = pipe.text_encoder.tokenizer.convert_tokens_to_ids(tokens)
    for prompt in ("a red circle, EasyNegative", "a red circle, easynegative", "(EasyNegative:1.2)"):
        got = pipe.text_encoder.tokenize([prompt])["input_ids"][0].tolist()
        assert all(i in got for i in ids), (prompt, got, ids)
    weighted = pipe.text_encoder.encode(["(EasyNegative:1.2)"], emphasis=True)
    assert weighted.states.shape[1] == 77


@pytest.mark.parametrize("layout", ["string_to_param", "emb_params"])
def test_embeddings_bundled_in_a_lora_file(tmp_path, layout, caplog):
    """kohya-ss / AUTOMATIC1111 bundle embeddings in a LoRA file (`bundle_emb.<word>.*`, the embedding file's
    entries under its word): merging that LoRA at load gives the model with the plain LoRA merged and the embedding
    file loaded under that word, bit for bit. A prompt's tag merges the LoRA but adds no word (one request must not
    change the next), and says so; a bundle that does not fit changes nothing."""
    from test_lora import _kohya_lora

    ref = save_diffusers_folder(tmp_path / "folder", "sd1")
    lora = _kohya_lora(ref.unet, ref.text_encoder)
    vectors = _vectors(3, seed=4)
    bundle = ({"bundle_emb.mystyle.string_to_param.*": vectors} if layout == "string_to_param"
              else {"bundle_emb.mystyle.emb_params": vectors})
    (tmp_path / "loras").mkdir()
    save_file({**lora, **bundle}, str(tmp_path / "loras" / "bundled.safetensors"))
    save_file(lora, str(tmp_path / "plain.safetensors"))
    kw = dict(steps=3, seed=5, height=SIZE, width=SIZE, progress=False, output_type="latent")
    prompt = "a mystyle circle"
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", loras=[(tmp_path / "loras" / "bundled.safetensors",
                                                                            0.8)])
    want = TextToImagePipeline.from_pretrained(tmp_path / "folder", loras=[(tmp_path / "plain.safetensors", 0.8)])
    want.load_embedding(_write("a1111.safetensors", vectors, tmp_path / "emb", "mystyle"))
    assert pipe.embeddings == ["mystyle"]
    assert torch.equal(pipe.generate(prompt, **kw).latents, want.generate(prompt, **kw).latents)
    # a prompt's tag: the LoRA merged, the word not added
    asked = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    asked.lora_dir = tmp_path / "loras"
    with caplog.at_level("WARNING"):
        got = asked.generate(prompt + " <lora:bundled:0.8>", **kw).latents
    assert "bundles embeddings (mystyle) that a prompt's tag does not load" in caplog.text
    plain_merged = TextToImagePipeline.from_pretrained(tmp_path / "folder",
                                                       loras=[(tmp_path / "plain.safetensors", 0.8)])
    assert asked.embeddings == [] and torch.equal(got, plain_merged.generate(prompt, **kw).latents)
    # the embedding file given with --embedding keeps its vectors over the bundled word's
    other = _vectors(3, seed=9)
    both = TextToImagePipeline.from_pretrained(tmp_path / "folder", embeddings=[_write(
        "a1111.safetensors", other, tmp_path / "emb2", "mystyle")], loras=[(tmp_path / "loras" / "bundled.safetensors",
                                                                            0.8)])
    file_only = TextToImagePipeline.from_pretrained(tmp_path / "folder", loras=[(tmp_path / "plain.safetensors", 0.8)])
    file_only.load_embedding(tmp_path / "emb2" / "mystyle.safetensors")
    assert torch.equal(both.generate(prompt, **kw).latents, file_only.generate(prompt, **kw).latents)
    # an SDXL bundle on SD 1.x, a bundle of unknown entries, two bundled words that share a token: refused before
    # anything is merged
    for bad, message in (({"bundle_emb.x.clip_l": vectors, "bundle_emb.x.clip_g": vectors.clone()},
                          "is an SDXL embedding"),
                         ({"bundle_emb.x.weights": vectors}, "the bundled embedding 'x' has \\['weights'\\]"),
                         ({"bundle_emb.ab.emb_params": vectors, "bundle_emb.ab_1.emb_params": vectors.clone()},
                          "need the token 'ab_1' twice")):
        save_file({**lora, **bad}, str(tmp_path / "bad.safetensors"))
        fresh = TextToImagePipeline.from_pretrained(tmp_path / "folder")
        before = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
        with pytest.raises(ValueError, match=message):
            fresh.load_lora(tmp_path / "bad.safetensors")
        assert fresh.loras == [] and fresh.embeddings == []
        assert all(torch.equal(before[k], v) for k, v in fresh.unet.state_dict().items())
