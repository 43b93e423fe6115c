"""LoRA merged into a model (Hu et al. 2021 eq. 3): files in kohya-ss / AUTOMATIC1111 names and in
the format diffusers writes (peft's lora_A / lora_B with its LoraConfig in the safetensors header)
change the U-Net, the text encoder and the final image exactly as diffusers' own LoRA loading does
(`load_lora_weights` + `fuse_lora(lora_scale=s)`, through peft) on the same weights, and
imagine's merge agrees with the closed form W + s (alpha / r) B A."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from test_loading import rel_err, save_diffusers_folder, write_single_file  # noqa: E402
from test_sd_parity import _diffusers_image, _our_image, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402

from imagine.loading.lora import lora_layers, merge_lora  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1",
                "time_emb_proj", "conv_shortcut")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _kohya_lora(unet, text, rank=4, alpha=2.0, seed=0) -> dict:
    """A LoRA as kohya-ss' sd-scripts saves one for SD 1.x: lora_down / lora_up / alpha per layer, the
    module's diffusers name with underscores; the U-Net's 3x3 conv1 gets a LoCon factor (3x3 down, 1x1 up)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, model, targets, te in (("lora_unet", unet, UNET_TARGETS, False),
                                       ("lora_te", text, TEXT_TARGETS, True)):
        for name, mod in model.named_modules():
            if not name.endswith(targets) or not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            key = f"{prefix}_{('text_model.' + name) if te else name}".replace(".", "_")
            w = mod.weight
            if w.ndim == 4:
                down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.3
                up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.3
            else:
                down = torch.randn(rank, w.shape[1], generator=g) * 0.3
                up = torch.randn(w.shape[0], rank, generator=g) * 0.3
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def _peft_lora_file(ref, folder):
    """A LoRA written by diffusers itself: peft adapters with random factors on the U-Net (r 4, alpha 8)
    and text encoder (r 2, alpha 1), saved by StableDiffusionPipeline.save_lora_weights with their
    LoraConfigs in the header. Returns the file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
                      init_lora_weights=False)
    tcfg = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    ref.unet.add_adapter(ucfg)
    # (transformers' own add_adapter wants a newer peft than the registry has: peft's injection directly)
    inject_adapter_in_model(tcfg, ref.text_encoder)
    text_layers = {k.replace(".default.", "."): v for k, v in ref.text_encoder.state_dict().items() if ".lora_" in k}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(ref.unet), text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict(),
        safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def _compare_networks(ours: TextToImagePipeline, ref, size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([999.0, 20.5])
    ctx = torch.randn(2, 77, 64, generator=g)
    ids = ours.text_encoder.tokenize(["a red circle", "the blue square"])["input_ids"]
    with torch.no_grad():
        assert rel_err(ours.unet(x, t, context=ctx), ref.unet(x, t, ctx).sample) < 1e-4
        assert rel_err(ours.text_encoder.encode(["a red circle", "the blue square"]).states,
                       ref.text_encoder(ids).last_hidden_state) < 1e-4


def fused_reference(ref, state: dict, scale: float, image) -> tuple:
    """diffusers' image before and after load_lora_weights + fuse_lora of `state` at `scale` (`image(ref)` draws
    it); the LoRA must show in the picture."""
    plain = image(ref)
    ref.load_lora_weights(dict(state))
    ref.fuse_lora(lora_scale=scale)
    want = image(ref)
    assert psnr(plain, want) < 30  # the LoRA shows in the picture
    return plain, want


def test_kohya_lora_matches_diffusers(tmp_path):
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    single = tmp_path / "single" / "model.safetensors"
    write_single_file(single, "sd1")
    state = _kohya_lora(ref.unet, ref.text_encoder)
    path = tmp_path / "style.safetensors"
    save_file(state, str(path))
    want = fused_reference(ref, state, 0.7, _diffusers_image)[1]
    for model in (single, tmp_path / "folder"):
        ours = TextToImagePipeline.from_pretrained(model, loras=[(path, 0.7)])
        _compare_networks(ours, ref)
        got = _our_image(ours, "ddim")
        assert psnr(got, want) >= 50, f"{model}: PSNR {psnr(got, want):.1f} dB"


def test_lora_written_by_diffusers_matches_diffusers(tmp_path):
    """peft's factors and diffusers' header (lora_alpha / r per part) from a real save_lora_weights file."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    path = _peft_lora_file(ref, tmp_path / "lora")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "folder", local_files_only=True,
                                                            safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=1.0)
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    in_file = {part: sum(k.startswith(part + ".") and k.endswith("lora_A.weight") for k in keys)
               for part in ("unet", "text_encoder")}
    assert ours.load_lora(path) == in_file and in_file["text_encoder"] == 3 * 2  # 3 layers in each CLIP block
    _compare_networks(ours, ref)
    assert psnr(_our_image(ours, "ddim"), _diffusers_image(ref)) >= 50


def test_merge_is_the_closed_form(tmp_path):
    """W + s (alpha / r) B A on a linear layer and a 3x3 convolution, computed here in float64; no alpha means
    alpha = r."""
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(6, 5)
    model.conv = torch.nn.Conv2d(3, 4, 3)
    w_lin, w_conv = model.lin.weight.detach().double().clone(), model.conv.weight.detach().double().clone()
    a1, b1 = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
    a2, b2 = torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g)
    state = {"lora_unet_lin.lora_down.weight": a1, "lora_unet_lin.lora_up.weight": b1,
             "lora_unet_lin.alpha": torch.tensor(1.0),
             "lora_unet_conv.lora_down.weight": a2, "lora_unet_conv.lora_up.weight": b2}
    assert merge_lora({"unet": model, "text_encoder": None}, lora_layers(state), 0.5) == {"unet": 2}
    want_lin = w_lin + 0.5 * (1.0 / 2) * (b1.double() @ a1.double())
    want_conv = w_conv + 0.5 * (b2.double().reshape(4, 2) @ a2.double().reshape(2, -1)).reshape(4, 3, 3, 3)
    assert torch.allclose(model.lin.weight.double(), want_lin, atol=1e-6)
    assert torch.allclose(model.conv.weight.double(), want_conv, atol=1e-6)


def test_generate_cli_merges_and_records_loras(tmp_path, capsys):
    from imagine.cli import main

    single = tmp_path / "single" / "tiny-sd.safetensors"
    unet, _, text = write_single_file(single, "sd1")
    path = tmp_path / "style.safetensors"
    save_file(_kohya_lora(unet, text), str(path))
    outs = []
    for extra in ([], ["--lora", f"{path}:0.5"]):
        out = tmp_path / f"x{len(extra)}.png"
        assert main(["generate", "--model", str(single), *extra, "a red circle", "--steps", "2", "--seed", "3",
                     "--height", "32", "--width", "32", "-o", str(out), "-q"]) == 0
        outs.append(Image.open(out))
    assert json.loads(outs[1].text["imagine"])["lora"] == "style: 0.5"
    assert 'Lora: "style: 0.5"' in outs[1].text["parameters"] and "Lora" not in outs[0].text["parameters"]
    assert outs[0].tobytes() != outs[1].tobytes()


def test_cached_fast_and_exact_copies_follow_a_merge(tmp_path):
    """A LoRA merged after the pipeline has run: the cached copies of both modes see the new weights."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    path = tmp_path / "style.safetensors"
    save_file(_kohya_lora(ref.unet, ref.text_encoder), str(path))
    before = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    _our_image(before, "ddim")  # builds and caches the copy
    before.load_lora(path)
    fresh = TextToImagePipeline.from_pretrained(tmp_path / "folder", loras=[path])
    assert psnr(_our_image(before, "ddim"), _our_image(fresh, "ddim")) == float("inf")


def test_bad_loras_get_clear_errors(tmp_path):
    ref = save_diffusers_folder(tmp_path / "folder", "sd1")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="LoRA not found"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    cases = {
        "oft": ({"lora_unet_x.oft_blocks": torch.zeros(2, 2, 2)}, "LyCORIS OFT"),
        "half a loha": ({"lora_unet_conv_in.hada_w1_a": torch.zeros(32, 2)}, "lacks hada_w1_b, hada_w2_a"),
        "sdxl": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2),
                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(2, 2)},
                 "a LoRA for SDXL and this model is SD 1.x/2.x"),
        "other": ({"model.weight": torch.zeros(2, 2)}, "not LoRA factors"),
        "half": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "only its down factor"),
        "absent": ({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
                    "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}, "no such layer"),
        "shape": ({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 5, 3, 3),
                   "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, "for a weight of shape"),
    }
    w = pipe.unet.conv_in.weight.detach().clone()
    for name, (state, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path))
        with pytest.raises(ValueError, match=message):
            pipe.load_lora(path)
    assert torch.equal(pipe.unet.conv_in.weight, w)  # nothing merged by a refused file
    with pytest.raises(ValueError, match="finite"):
        pipe.load_lora(path, float("nan"))


def test_server_lists_the_merged_loras(tmp_path):
    httpx = pytest.importorskip("httpx")
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    single = tmp_path / "single" / "tiny-sd.safetensors"
    unet, _, text = write_single_file(single, "sd1")
    path = tmp_path / "style.safetensors"
    save_file(_kohya_lora(unet, text), str(path))
    pipe = TextToImagePipeline.from_pretrained(single, loras=[(path, 0.8)])
    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        listed = httpx.get(f"{srv.url}/sdapi/v1/loras").json()
        assert [(x["name"], x["strength"]) for x in listed] == [("style", 0.8)]
        body = {"prompt": "a red circle <lora:style:0.8>", "steps": 1, "width": 32, "height": 32}
        assert httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120).status_code == 200
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:other:1>"}, timeout=120)
        assert r.status_code == 422 and "not merged" in r.json()["detail"]


def test_a1111_lora_tags_name_the_merged_loras(tmp_path):
    """`<lora:name:s>` in a prompt (AUTOMATIC1111) is taken out when that LoRA is merged at that strength, and
    is a clear error otherwise (imagine merges at load time, not per prompt)."""
    single = tmp_path / "single" / "tiny-sd.safetensors"
    unet, _, text = write_single_file(single, "sd1")
    path = tmp_path / "style.safetensors"
    save_file(_kohya_lora(unet, text), str(path))
    pipe = TextToImagePipeline.from_pretrained(single, loras=[(path, 0.8)])
    kw = dict(steps=2, seed=4, height=32, width=32, progress=False, output_type="latent")
    plain = pipe.generate("a red circle, ", **kw)
    tagged = pipe.generate("a red circle, <lora:style:0.8>", **kw)
    assert torch.equal(plain.latents, tagged.latents)
    assert tagged.parameters["prompt"] == ["a red circle, <lora:style:0.8>"]  # recorded as given
    with pytest.raises(ValueError, match="merged at strength 0.8"):
        pipe.generate("a red circle <lora:style:0.5>", **kw)
    with pytest.raises(ValueError, match="not merged into this model"):
        pipe.generate("x", "<lora:other:1>", **kw)
    with pytest.raises(ValueError, match="not a number"):
        pipe.generate("x <lora:style:strong>", **kw)
    # A1111's third field is the U-Net's strength: a LoRA merged at load is followed at its own strengths only
    assert torch.equal(pipe.generate("a red circle, <lora:style:0.8:0.8>", **kw).latents, plain.latents)
    for tag in ("<lora:style:0.8:0>", "<lora:style:0.8:unet=0.2>"):
        with pytest.raises(ValueError, match="is merged at strength 0.8; load it with --lora PATH:0.8:"):
            pipe.generate(f"a red circle, {tag}", **kw)
    with pytest.raises(ValueError, match="not a third field"):
        pipe.generate("a red circle, <lora:style:0.8:0.8:lbw=OUTD>", **kw)
    with pytest.raises(ValueError, match="merged already"):  # twice would add up to 1.6 under one name
        pipe.load_lora(path, 0.8)


def test_diffusers_attention_processor_names_merge_as_the_current_ones():
    """diffusers 0.14-0.20's save_attn_procs names (attn1.processor.to_q_lora.down.weight; for CLIP
    self_attn.to_q_lora.down.weight = q_proj) give the same layers and factors as today's lora_A / lora_B."""
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g),
                  torch.randn(6, 2, generator=g))
    old = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": a,
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": b,
           "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.down.weight": c,
           "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.up.weight": d}
    new = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": a,
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": b,
           "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_A.weight": c,
           "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_B.weight": d}
    got, want = lora_layers(old), lora_layers(new)
    assert [(x.part, x.module) for x in got] == [(x.part, x.module) for x in want]
    assert all(torch.equal(x.delta(), y.delta()) for x, y in zip(got, want))
