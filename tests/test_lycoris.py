"""LyCORIS' adapters and DoRA merged into a model as AUTOMATIC1111's built-in Lora extension merges them
(`imagine/loading/lora.py`), each against a truth of its own:

- LoHa and LoKr (with Tucker convolutions): peft's own implementations (LoHaConfig, LoKrConfig, the same entry
  names as LyCORIS), run unmerged on diffusers' U-Net and CLIP, against imagine's merge of the same factors
  written in kohya-ss names: outputs to 1e-4 relative, and the 20-step image at 50 dB or more;
- DoRA from diffusers' files: diffusers' `load_lora_weights` + `fuse_lora` through peft; LyCORIS' `dora_scale` at
  strength 1: peft's unmerged DoRA (one magnitude per output row) and the DoRA paper's defining property (each
  column's norm is its magnitude);
- LoCon's Tucker form: the three convolutions run one after another;
- full and norm differences: the model they were taken against.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from test_loading import rel_err, save_diffusers_folder  # noqa: E402
from test_lora import UNET_TARGETS, _compare_networks  # noqa: E402
from test_sd_parity import _diffusers_image, _our_image, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402

from imagine.loading.lora import LoraLayer, lora_layers, merge_lora  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _kohya_name(prefix: str, name: str) -> str:
    return f"{prefix}_{('text_model.' + name) if prefix == 'lora_te' and not name.startswith('text_model.') else name}" \
        .replace(".", "_")


def _adapter_file(models: dict, entries: tuple[str, ...], alpha: float) -> dict:
    """The peft adapters' factors on `models` ({"lora_unet": unet, "lora_te": text encoder}) as a kohya-ss /
    LyCORIS file: <prefix>_<module>.<entry> and .alpha."""
    state = {}
    for prefix, model in models.items():
        for name, mod in model.named_modules():
            params = {e: getattr(mod, e)["default"] for e in entries
                      if hasattr(mod, e) and "default" in getattr(mod, e)}
            if not params:
                continue
            key = _kohya_name(prefix, name)
            for entry, p in params.items():
                state[f"{key}.{entry}"] = p.detach().clone()
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def _randomize(model, entries, scale, seed):
    """peft's random init of LyCORIS factors multiplies out to large updates: draw them again, smaller."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{e}." in name for e in entries):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_matches_peft(tmp_path, kind):
    """A LoHa or LoKr on the U-Net's attention, feed-forward, projections, 3x3 convolutions (Tucker form) and
    time embedding, and on CLIP's layers, at strength 0.7 and alpha != r: imagine's merge gives peft's unmerged
    forward (U-Net and text encoder to 1e-4) and diffusers' image with those adapters (50 dB)."""
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    plain = _diffusers_image(ref)
    if kind == "loha":
        cfg = dict(r=3, alpha=5.0, use_effective_conv2d=True, init_weights=False)
        ucfg, tcfg, entries = LoHaConfig(target_modules=list(UNET_TARGETS), **cfg), \
            LoHaConfig(target_modules=TEXT_TARGETS, **cfg), LOHA
    else:
        # r 2 on the U-Net makes most factors low-rank; r 4 on CLIP's 64-wide layers (8 x 8 factors) keeps them whole
        cfg = dict(r=2, alpha=3.0, use_effective_conv2d=True, decompose_both=True, init_weights=False)
        ucfg, tcfg, entries = LoKrConfig(target_modules=list(UNET_TARGETS), **cfg), \
            LoKrConfig(target_modules=TEXT_TARGETS, **{**cfg, "r": 4}), LOKR
    inject_adapter_in_model(ucfg, ref.unet)
    inject_adapter_in_model(tcfg, ref.text_encoder)
    _randomize(ref.unet, entries, 0.3, 1)
    _randomize(ref.text_encoder, entries, 0.3, 2)
    whole = 0
    for model in (ref.unet, ref.text_encoder):
        for mod in model.modules():
            if hasattr(mod, "scaling") and "default" in getattr(mod, "scaling", {}):
                if kind == "lokr" and "default" in mod.lokr_w1 and "default" in mod.lokr_w2:
                    # both Kronecker factors whole: nothing is low-rank, and AUTOMATIC1111 scales by 1, not alpha / r
                    mod.scaling["default"] = 1.0
                    whole += 1
                mod.scale_layer(0.7)
    assert kind == "loha" or whole > 0  # the rule is exercised
    state = _adapter_file({"lora_unet": ref.unet, "lora_te": ref.text_encoder}, entries, cfg["alpha"])
    assert any(k.endswith(("hada_t1", "lokr_t2")) for k in state)  # Tucker convolutions in the file
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder", loras=[(path, 0.7)])
    _compare_networks(ours, ref)
    want = _diffusers_image(ref)
    assert psnr(plain, want) < 30  # the adapter shows in the picture
    assert psnr(_our_image(ours, "ddim"), want) >= 50


def test_dora_written_by_diffusers_matches_diffusers(tmp_path):
    """peft's DoRA (one magnitude per output row) saved by diffusers' save_lora_weights, fused by diffusers at
    lora_scale 0.7: m (W0 + s dW) / ||W0 + s dW||."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_out.0", "ff.net.2", "conv1", "proj_in"])
    torch.manual_seed(0)
    ref.unet.add_adapter(cfg)
    with torch.no_grad():  # magnitudes away from the base weight's norms, so that they matter
        for name, p in ref.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape))
    layers = get_peft_model_state_dict(ref.unet)
    assert any("lora_magnitude_vector" in k for k in layers)
    diffusers.StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=layers,
                                                        unet_lora_adapter_metadata=cfg.to_dict(),
                                                        safe_serialization=True)
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "folder", local_files_only=True,
                                                            safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    plain = _diffusers_image(ref)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.7)
    want = _diffusers_image(ref)
    assert psnr(plain, want) < 30
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder", loras=[(path, 0.7)])
    _compare_networks(ours, ref)
    assert psnr(_our_image(ours, "ddim"), want) >= 50


def test_lycoris_dora_per_row_matches_peft(tmp_path):
    """LyCORIS' `dora_scale` with one magnitude per output row ([out, 1, ...], its wd_on_out) beside kohya-ss
    factors, at strength 1, is peft's DoRA: imagine's merge against peft's unmerged forward."""
    from peft import LoraConfig

    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    cfg = LoraConfig(r=4, lora_alpha=6, use_dora=True, init_lora_weights=False,
                     target_modules=["to_q", "to_v", "ff.net.0.proj", "conv1", "conv2"])
    torch.manual_seed(1)
    ref.unet.add_adapter(cfg)
    with torch.no_grad():
        for name, p in ref.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape))

    state = {}
    for name, mod in ref.unet.named_modules():
        if "default" not in getattr(mod, "lora_magnitude_vector", {}):
            continue
        key, w = _kohya_name("lora_unet", name), mod.base_layer.weight
        state[f"{key}.lora_down.weight"] = mod.lora_A["default"].weight.detach().clone()
        state[f"{key}.lora_up.weight"] = mod.lora_B["default"].weight.detach().clone()
        state[f"{key}.alpha"] = torch.tensor(6.0)
        m = mod.lora_magnitude_vector["default"].weight.detach()
        state[f"{key}.dora_scale"] = m.reshape(w.shape[0], *[1] * (w.ndim - 1)).clone()
    assert sum(k.endswith("dora_scale") for k in state) > 10
    path = tmp_path / "dora.safetensors"
    save_file(state, str(path))
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder", loras=[(path, 1.0)])
    _compare_networks(ours, ref)


def test_dora_per_column_is_automatic1111s_rule():
    """LyCORIS' default `dora_scale` [1, in, ...]: at strength 1 each input column of the merged weight has the
    norm the file gives it (the DoRA paper's W' = m V / ||V||_c), for a linear layer and a 3x3 convolution; at
    strength s the merge moves s of the way there (AUTOMATIC1111's rule); a scale entry replaces alpha / r."""
    g = torch.Generator().manual_seed(3)
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(6, 5)
    model.conv = torch.nn.Conv2d(3, 4, 3)
    w0 = {n: getattr(model, n).weight.detach().double().clone() for n in ("lin", "conv")}
    m_lin, m_conv = torch.rand(1, 6, generator=g) + 0.5, torch.rand(1, 3, 1, 1, generator=g) + 0.5
    state = {"lora_unet_lin.lora_down.weight": torch.randn(2, 6, generator=g),
             "lora_unet_lin.lora_up.weight": torch.randn(5, 2, generator=g),
             "lora_unet_lin.alpha": torch.tensor(1.0), "lora_unet_lin.dora_scale": m_lin,
             "lora_unet_conv.lora_down.weight": torch.randn(2, 3, 3, 3, generator=g),
             "lora_unet_conv.lora_up.weight": torch.randn(4, 2, 1, 1, generator=g),
             "lora_unet_conv.scale": torch.tensor(0.25), "lora_unet_conv.alpha": torch.tensor(8.0),
             "lora_unet_conv.dora_scale": m_conv}
    merge_lora({"unet": model, "text_encoder": None}, lora_layers(state), 1.0)
    col = lambda w: w.transpose(0, 1).flatten(1).norm(dim=1)  # noqa: E731
    assert torch.allclose(col(model.lin.weight.double()), m_lin.double().flatten(), atol=1e-6)
    assert torch.allclose(col(model.conv.weight.double()), m_conv.double().flatten(), atol=1e-6)
    # the direction is that of W0 + (alpha / r) B A (lin) and W0 + scale * B A (conv)
    v_lin = w0["lin"] + 0.5 * state["lora_unet_lin.lora_up.weight"].double() @ state["lora_unet_lin.lora_down.weight"].double()
    assert torch.allclose(model.lin.weight.double(), v_lin * m_lin.double() / col(v_lin), atol=1e-6)
    layers = {layer.module: layer for layer in lora_layers(state)}
    at_one = {n: layers[n].delta(1.0, w0[n].float()).double() for n in ("lin", "conv")}
    for n in ("lin", "conv"):
        assert torch.allclose(layers[n].delta(0.4, w0[n].float()).double(), 0.4 * at_one[n], atol=1e-6)
    assert torch.allclose(w0["conv"] + at_one["conv"], model.conv.weight.double(), atol=1e-6)
    up, down = state["lora_unet_conv.lora_up.weight"].double(), state["lora_unet_conv.lora_down.weight"].double()
    v_conv = w0["conv"] + 0.25 * (up.flatten(1) @ down.flatten(1)).reshape(4, 3, 3, 3)
    assert torch.allclose(model.conv.weight.double(), v_conv * m_conv.double() / col(v_conv).reshape(1, 3, 1, 1),
                          atol=1e-6)


def test_dora_per_row_at_a_strength():
    """LyCORIS' per-row `dora_scale` ([out, 1]) at strength s: s of the way to the decomposed weight, whose rows then
    have the file's norms (the rule checked against peft at s = 1 above, here where A1111's and diffusers' differ)."""
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(5, 6, generator=g)
    m = torch.rand(5, 1, generator=g) + 0.5
    layer = LoraLayer("unet", "lin", {"lora_down": torch.randn(2, 6, generator=g),
                                      "lora_up": torch.randn(5, 2, generator=g), "dora_scale": m}, alpha=1.0)
    v = w0.double() + 0.5 * (layer.w["lora_up"].double() @ layer.w["lora_down"].double())
    decomposed = v * m.double() / v.norm(dim=1, keepdim=True)
    assert torch.allclose(w0.double() + layer.delta(1.0, w0).double(), decomposed, atol=1e-5)
    assert torch.allclose((w0.double() + layer.delta(1.0, w0).double()).norm(dim=1), m.double().flatten(), atol=1e-5)
    assert torch.allclose(layer.delta(0.3, w0).double(), 0.3 * (decomposed - w0.double()), atol=1e-5)


def test_locon_tucker_is_three_convolutions():
    """LoCon's Tucker form (lora_down 1x1, lora_mid 3x3, lora_up 1x1): the merged layer's change is those three
    convolutions run in a row, times s alpha / r."""
    g = torch.Generator().manual_seed(4)
    model = torch.nn.Module()
    model.conv = torch.nn.Conv2d(5, 6, 3, padding=1)
    down, mid, up = (torch.randn(2, 5, 1, 1, generator=g), torch.randn(2, 2, 3, 3, generator=g),
                     torch.randn(6, 2, 1, 1, generator=g))
    state = {"lora_unet_conv.lora_down.weight": down, "lora_unet_conv.lora_mid.weight": mid,
             "lora_unet_conv.lora_up.weight": up, "lora_unet_conv.alpha": torch.tensor(3.0)}
    x = torch.randn(1, 5, 7, 7, generator=g)
    with torch.no_grad():
        before = model.conv(x)
        merge_lora({"unet": model, "text_encoder": None}, lora_layers(state), 0.8)
        after = model.conv(x)
        chain = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    assert rel_err(after - before, 0.8 * 1.5 * chain) < 1e-5


def test_full_and_norm_differences_give_the_other_model(tmp_path):
    """LyCORIS' full differences (diff, diff_b) of every linear layer and convolution, and norm differences
    (w_norm, b_norm) of every GroupNorm and LayerNorm, taken between two random U-Nets: merged at strength 1 into
    the first (loaded by imagine), it is the second (diffusers' output to 1e-4); at 0.5, half way."""
    a = save_diffusers_folder(tmp_path / "a", "sd1")
    b = save_diffusers_folder(tmp_path / "b", "sd1", seed=1)
    state = {}
    mods_b = dict(b.unet.named_modules())
    for name, mod in a.unet.named_modules():
        kinds = {torch.nn.Linear: ("diff", "diff_b"), torch.nn.Conv2d: ("diff", "diff_b"),
                 torch.nn.GroupNorm: ("w_norm", "b_norm"), torch.nn.LayerNorm: ("w_norm", "b_norm")}
        if type(mod) not in kinds or mod.weight is None:
            continue
        key, (w_entry, b_entry) = _kohya_name("lora_unet", name), kinds[type(mod)]
        state[f"{key}.{w_entry}"] = (mods_b[name].weight - mod.weight).detach().clone()
        if mod.bias is not None:
            state[f"{key}.{b_entry}"] = (mods_b[name].bias - mod.bias).detach().clone()
    assert sum(k.endswith("b_norm") for k in state) > 5 and sum(k.endswith("diff_b") for k in state) > 20
    path = tmp_path / "full.safetensors"
    save_file(state, str(path))
    ours = TextToImagePipeline.from_pretrained(tmp_path / "a", loras=[(path, 1.0)])
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999.0, 20.5]), torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        assert rel_err(ours.unet(x, t, context=ctx), b.unet(x, t, ctx).sample) < 1e-4
    half = TextToImagePipeline.from_pretrained(tmp_path / "a", loras=[(path, 0.5)])
    wa, wb = a.unet.mid_block.resnets[0].norm1.bias, b.unet.mid_block.resnets[0].norm1.bias
    assert torch.allclose(half.unet.mid_block.resnets[0].norm1.bias, (wa + wb).detach() / 2, atol=1e-6)


def test_bad_lycoris_files_get_clear_errors():
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(4, 4, bias=False)
    model.norm = torch.nn.LayerNorm(4)
    fit = {"unet": model, "text_encoder": None}
    z = torch.zeros
    cases = {
        "OFT": ({"lora_unet_lin.oft_blocks": z(2, 2, 2)}, "LyCORIS OFT"),
        "IA3": ({"lora_unet_lin.weight": z(4), "lora_unet_lin.on_input": torch.tensor(0)}, r"\(IA\)\^3"),
        "half a LoHa": ({"lora_unet_lin.hada_w1_a": z(4, 2), "lora_unet_lin.hada_w1_b": z(2, 4)},
                        "lacks hada_w2_a, hada_w2_b"),
        "LoKr without W2": ({"lora_unet_lin.lokr_w1": z(2, 2), "lora_unet_lin.lokr_w2_a": z(2, 1)},
                            "lacks lokr_w2_b"),
        "two kinds": ({"lora_unet_lin.lora_down.weight": z(2, 4), "lora_unet_lin.lora_up.weight": z(4, 2),
                       "lora_unet_lin.diff": z(4, 4)}, "mixes entries of different kinds"),
        "DoRA alone": ({"lora_unet_lin.dora_scale": z(1, 4)}, "DoRA magnitudes and no update"),
        "an alpha of many values": ({"lora_unet_lin.lora_down.weight": z(2, 4), "lora_unet_lin.lora_up.weight": z(4, 2),
                                     "lora_unet_lin.alpha": z(2)}, "its alpha holds 2 values"),
    }
    for name, (state, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            lora_layers(state, name)
    misfits = {
        "LoKr of the wrong size": ({"lora_unet_lin.lokr_w1": z(2, 2), "lora_unet_lin.lokr_w2": z(3, 2)},
                                   "for a weight of shape"),
        "bias for no bias": ({"lora_unet_lin.diff": z(4, 4), "lora_unet_lin.diff_b": z(4)}, "no bias"),
        "norm for a linear layer": ({"lora_unet_lin.w_norm": z(4)}, "a norm update for a Linear"),
        "diff for a norm": ({"lora_unet_norm.diff": z(4)}, "a full update for a LayerNorm"),
        "DoRA of the wrong size": ({"lora_unet_lin.lora_down.weight": z(2, 4), "lora_unet_lin.lora_up.weight": z(4, 2),
                                    "lora_unet_lin.dora_scale": z(1, 3)}, "DoRA magnitudes of shape"),
        "LoRA factors that do not multiply": ({"lora_unet_lin.lora_down.weight": z(2, 4),
                                               "lora_unet_lin.lora_up.weight": z(4, 3)}, "do not multiply"),
        "LoHa halves that do not match": ({"lora_unet_lin.hada_w1_a": z(4, 2), "lora_unet_lin.hada_w1_b": z(2, 4),
                                           "lora_unet_lin.hada_w2_a": z(4, 2), "lora_unet_lin.hada_w2_b": z(3, 4)},
                                          "do not multiply"),
        "a Tucker core of the wrong rank": ({"lora_unet_lin.lora_down.weight": z(2, 4, 1, 1),
                                             "lora_unet_lin.lora_mid.weight": z(3, 3, 1, 1),
                                             "lora_unet_lin.lora_up.weight": z(4, 2, 1, 1)}, "do not multiply"),
        "a one-dimensional LoKr factor": ({"lora_unet_lin.lokr_w1": z(2), "lora_unet_lin.lokr_w2": z(2, 4)},
                                          "do not multiply"),
        "DoRA on a norm": ({"lora_unet_norm.w_norm": z(4), "lora_unet_norm.dora_scale": z(4)},
                           "DoRA magnitudes for a layer without input columns"),
    }
    w = model.lin.weight.detach().clone()
    for name, (state, message) in misfits.items():
        with pytest.raises(ValueError, match=message):
            merge_lora(fit, lora_layers(state, name), 1.0, name)
    assert torch.equal(model.lin.weight, w)
    with pytest.raises(ValueError, match="needs the layer's weight"):
        LoraLayer("unet", "lin", {"lora_down": z(2, 4), "lora_up": z(4, 2), "dora_scale": z(1, 4)}).delta()


def test_a_prompts_lyco_tag_merges_a_loha_and_it_goes_away_exactly(tmp_path):
    """AUTOMATIC1111's `<lyco:name:s>` (its alias of `<lora:...>`) naming a LoHa in the LoRA folder: the image of the
    model with that LoHa merged at load; the next prompt without it gets the plain model's image, bit for bit."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    g = torch.Generator().manual_seed(5)
    state = {}
    for name, mod in ref.unet.named_modules():
        if name.endswith(("to_q", "to_v", "ff.net.2")):
            key = _kohya_name("lora_unet", name)
            out, fan_in = mod.weight.shape
            for i in "12":
                state[f"{key}.hada_w{i}_a"] = torch.randn(out, 2, generator=g) * 0.5
                state[f"{key}.hada_w{i}_b"] = torch.randn(2, fan_in, generator=g) * 0.5
            state[f"{key}.alpha"] = torch.tensor(1.0)
    (tmp_path / "loras").mkdir()
    save_file(state, str(tmp_path / "loras" / "texture.safetensors"))
    kw = dict(steps=3, seed=11, progress=False, output_type="latent")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    pipe.lora_dir = tmp_path / "loras"
    plain = pipe.generate("a red circle", **kw).latents
    asked = pipe.generate("a red circle <lyco:texture:0.6>", **kw)
    merged = TextToImagePipeline.from_pretrained(tmp_path / "folder",
                                                 loras=[(tmp_path / "loras" / "texture.safetensors", 0.6)])
    assert torch.equal(asked.latents, merged.generate("a red circle", **kw).latents)
    assert not torch.equal(asked.latents, plain) and pipe.request_loras == [("texture", 0.6)]
    assert torch.equal(pipe.generate("a red circle", **kw).latents, plain)
