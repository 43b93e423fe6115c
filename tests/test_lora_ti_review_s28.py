"""Session 28's review of LoRA, textual-inversion and file-hash loading against AUTOMATIC1111's built-in Lora
extension (networks.py, network.py, network_lora / _hada / _lokr / _full / _norm.py, lyco_helpers.py), its
modules/textual_inversion and modules/hashes.py, and diffusers' own loaders, on tiny files written here.

Each update kind's merge is checked against the closed form AUTOMATIC1111 computes (written out here in float64):
alpha / r with r the inner size, a scale of 1 for whole factors and differences, the bias difference without alpha,
DoRA by input columns. The differences found and fixed, each shown on its own file:

- peft's `lora_A` / `lora_B` under a kohya-ss layer name (`lora_unet_..._to_q.lora_A.weight`): AUTOMATIC1111's
  network_lora reads them as down / up; imagine refused the file (diffusers still does);
- a LoRA made on a 4-channel U-Net merged into an inpainting model (9 input channels): AUTOMATIC1111 pads the first
  convolution's update with zeros for the mask and masked-image channels; imagine refused the file (diffusers does,
  a size mismatch);
- diffusers' saved `alpha_pattern`: peft takes the first pattern that matches a layer, each as
  re.match(rf"(.*\\.)?({pattern})$", name); imagine took the last, and read a pattern with `|` wrongly;
- "Lora hashes": AUTOMATIC1111 takes a safetensors LoRA's `sshs_model_hash` metadata (kohya-ss writes it) before
  hashing anything; imagine always hashed the tensors;
- an A1111 .pt whose string_to_param holds two terms: AUTOMATIC1111 refuses it ("multiple terms"); imagine took the
  first without a word.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from imagine.loading import hashes
from imagine.loading.lora import lora_layers, merge_lora
from imagine.loading.textual_inversion import read_embedding_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(g, *shape):
    return torch.randn(*shape, generator=g) * 0.3


def _model() -> torch.nn.Module:
    """One layer per case: linear 8x6, 3x3 convolutions 8x6 (and an inpainting U-Net's first one, 9 inputs), a
    GroupNorm of 8."""
    torch.manual_seed(3)
    m = torch.nn.Module()
    for name in ("lora", "lora_dyn", "loha", "lokr", "lokr_ab", "full", "dora", "lora_ab"):
        setattr(m, name, torch.nn.Linear(6, 8))
    for name in ("locon", "tucker", "loha_tucker", "lokr_conv", "locon_dyn"):
        setattr(m, name, torch.nn.Conv2d(6, 8, 3))
    m.conv_in = torch.nn.Conv2d(9, 8, 3)
    m.norm = torch.nn.GroupNorm(2, 8)
    with torch.no_grad():
        m.norm.weight.add_(torch.randn(8) * 0.1)
    return m


def _cases(g) -> dict[str, tuple[dict, torch.Tensor | None, object]]:
    """{layer: (entries, alpha, the update AUTOMATIC1111 adds at strength 1 as a function of the weight W0)}."""
    a, b = _rand(g, 2, 6), _rand(g, 8, 2)
    d3, u3 = _rand(g, 3, 6, 3, 3), _rand(g, 8, 3, 1, 1)
    td, tu, tm = _rand(g, 2, 6, 1, 1), _rand(g, 8, 2, 1, 1), _rand(g, 2, 2, 3, 3)
    h = [_rand(g, 8, 2), _rand(g, 2, 6), _rand(g, 8, 2), _rand(g, 2, 6)]
    ht = [_rand(g, 2, 8), _rand(g, 2, 6), _rand(g, 2, 2, 3, 3), _rand(g, 2, 8), _rand(g, 2, 6), _rand(g, 2, 2, 3, 3)]
    k1, k2 = _rand(g, 2, 2), _rand(g, 4, 3)
    k1a, k1b, k2a, k2b = _rand(g, 2, 1), _rand(g, 1, 2), _rand(g, 4, 1), _rand(g, 1, 3)
    kc = _rand(g, 4, 3, 3, 3)
    diff, diff_b, w_norm, b_norm = _rand(g, 8, 6), _rand(g, 8), _rand(g, 8), _rand(g, 8)
    m = _rand(g, 1, 6).abs() + 1
    ci_d, ci_u = _rand(g, 2, 4, 3, 3), _rand(g, 8, 2, 1, 1)
    dd, du = _rand(g, 4, 6), _rand(g, 8, 4)
    cd, cu = _rand(g, 4, 6, 3, 3), _rand(g, 8, 4, 1, 1)
    D = lambda t: t.double()  # noqa: E731

    def cp(t, wa, wb):  # a Tucker core between 1x1 maps: sum_ij t[i, j] wa[i, out] wb[j, in]
        return torch.einsum("ijkl,ip,jr->prkl", D(t), D(wa), D(wb))

    def dora(update):  # W0 + dW directed, each input column's norm set to m (AUTOMATIC1111, LyCORIS' default)
        def f(w0):
            merged = w0 + update
            return merged * D(m) / merged.norm(dim=0, keepdim=True) - w0
        return f

    return {
        "lora": ({"lora_down.weight": a, "lora_up.weight": b}, 1.0, lambda w0: 1.0 / 2 * D(b) @ D(a)),
        "lora_ab": ({"lora_A.weight": a, "lora_B.weight": b}, 1.0, lambda w0: 1.0 / 2 * D(b) @ D(a)),
        "locon": ({"lora_down.weight": d3, "lora_up.weight": u3}, 6.0,
                  lambda w0: 6.0 / 3 * (D(u3).flatten(1) @ D(d3).flatten(1)).reshape(8, 6, 3, 3)),
        "tucker": ({"lora_down.weight": td, "lora_up.weight": tu, "lora_mid.weight": tm}, 1.0,
                   lambda w0: 1.0 / 2 * cp(tm, D(tu).flatten(1).T, D(td).flatten(1))),
        "loha": ({"hada_w1_a": h[0], "hada_w1_b": h[1], "hada_w2_a": h[2], "hada_w2_b": h[3]}, 3.0,
                 lambda w0: 3.0 / 2 * (D(h[0]) @ D(h[1])) * (D(h[2]) @ D(h[3]))),
        "loha_tucker": ({"hada_w1_a": ht[0], "hada_w1_b": ht[1], "hada_t1": ht[2], "hada_w2_a": ht[3],
                         "hada_w2_b": ht[4], "hada_t2": ht[5]}, 4.0,
                        lambda w0: 4.0 / 2 * cp(ht[2], ht[0], ht[1]) * cp(ht[5], ht[3], ht[4])),
        # whole factors: a scale of 1 whatever alpha says
        "lokr": ({"lokr_w1": k1, "lokr_w2": k2}, 5.0, lambda w0: torch.kron(D(k1), D(k2))),
        # r from W2's factors where it has them (else W1's)
        "lokr_ab": ({"lokr_w1_a": k1a, "lokr_w1_b": k1b, "lokr_w2_a": k2a, "lokr_w2_b": k2b}, 3.0,
                    lambda w0: 3.0 / 1 * torch.kron(D(k1a) @ D(k1b), D(k2a) @ D(k2b))),
        "lokr_conv": ({"lokr_w1": k1, "lokr_w2": kc}, 5.0, lambda w0: torch.kron(D(k1)[:, :, None, None], D(kc))),
        "full": ({"diff": diff, "diff_b": diff_b}, 7.0, lambda w0: D(diff)),
        "norm": ({"w_norm": w_norm, "b_norm": b_norm}, None, lambda w0: D(w_norm)),
        "dora": ({"lora_down.weight": a, "lora_up.weight": b, "dora_scale": m}, 1.0,
                 lambda w0: dora(1.0 / 2 * D(b) @ D(a))(w0)),
        # a 4-channel U-Net's conv_in in an inpainting U-Net: the other five input channels get nothing
        "conv_in": ({"lora_down.weight": ci_d, "lora_up.weight": ci_u}, 1.0, lambda w0: torch.nn.functional.pad(
            1.0 / 2 * (D(ci_u).flatten(1) @ D(ci_d).flatten(1)).reshape(8, 4, 3, 3), (0, 0, 0, 0, 0, 5))),
    }, {"lora_dyn": (dd, du), "locon_dyn": (cd, cu)}


def _state(cases, dyn_layers, alphas=True):
    state = {}
    for layer, (entries, alpha, _) in cases.items():
        state.update({f"lora_unet_{layer}.{k}": v for k, v in entries.items()})
        if alpha is not None and alphas:
            state[f"lora_unet_{layer}.alpha"] = torch.tensor(alpha)
    for layer, (down, up) in dyn_layers.items():
        state[f"lora_unet_{layer}.lora_down.weight"], state[f"lora_unet_{layer}.lora_up.weight"] = down, up
        state[f"lora_unet_{layer}.alpha"] = torch.tensor(2.0)
    return state


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_every_kind_merges_as_automatic1111_computes_it(strength):
    """W0 + s x (AUTOMATIC1111's update) per kind, float64 closed forms; bias differences at s without alpha; DoRA
    moves s of the way to the decomposed weight. Before the fix the lora_A / lora_B and conv_in layers were refused."""
    cases, dyn_layers = _cases(torch.Generator().manual_seed(0))
    model = _model()
    before = {n: (m.weight.detach().double().clone(), None if m.bias is None else m.bias.detach().double().clone())
              for n, m in model.named_children()}
    assert merge_lora({"unet": model, "text_encoder": None}, lora_layers(_state(cases, dyn_layers)),
                      strength) == {"unet": len(cases) + len(dyn_layers)}
    for layer, (_, _, want) in cases.items():
        w0, b0 = before[layer]
        got = getattr(model, layer).weight.double()
        assert torch.allclose(got, w0 + strength * want(w0), atol=1e-5), layer
        bias = {"full": "diff_b", "norm": "b_norm"}.get(layer)
        if bias is not None:
            assert torch.allclose(getattr(model, layer).bias.double(), b0 + strength * cases[layer][0][bias].double(),
                                  atol=1e-6), layer
        elif b0 is not None:
            assert torch.equal(getattr(model, layer).bias.double(), b0), layer
    assert torch.equal(model.conv_in.weight.double()[:, 4:], before["conv_in"][0][:, 4:])


def test_kohya_names_with_lora_a_and_b_merge_as_down_and_up(tmp_path):
    """A file in kohya-ss layer names with peft's lora_A / lora_B entries (AUTOMATIC1111's network_lora renames them
    down / up) gives what the same file with lora_down / lora_up gives; diffusers refuses it."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from safetensors.torch import save_file
    from test_loading import save_diffusers_folder
    from test_lora import _kohya_lora

    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref = save_diffusers_folder(tmp_path / "folder", "sd1")
    down_up = _kohya_lora(ref.unet, ref.text_encoder)
    a_b = {k.replace("lora_down.weight", "lora_A.weight").replace("lora_up.weight", "lora_B.weight"): v
           for k, v in down_up.items()}
    pipes = []
    for name, state in (("down_up", down_up), ("a_b", a_b)):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
        pipe.load_lora(tmp_path / f"{name}.safetensors", 0.7)
        pipes.append(pipe)
    for part in ("unet", "text_encoder"):
        one, two = (dict(p._lora_parts()[part].state_dict()) for p in pipes)
        assert all(torch.equal(one[k], two[k]) for k in one), part
    plain = TextToImagePipeline.from_pretrained(tmp_path / "folder")._lora_parts()
    for part in ("unet", "text_encoder"):  # (the file changed both)
        one, two = plain[part].state_dict(), pipes[1]._lora_parts()[part].state_dict()
        assert any(not torch.equal(one[k], two[k]) for k in one), part
    with pytest.raises(ValueError, match="not been correctly renamed"):
        diffusers.StableDiffusionPipeline.lora_state_dict(dict(a_b))


def test_a_lora_for_sd_merges_into_an_inpainting_model_as_automatic1111_pads_it(tmp_path):
    """A kohya-ss file with a LoCon on conv_in (4 input channels) into a 9-channel inpainting U-Net: conv_in's first
    4 input channels change as in the 4-channel model, the other 5 not at all, every other layer as in the 4-channel
    model (AUTOMATIC1111's zero padding); diffusers refuses the file (a size mismatch)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from safetensors.torch import save_file
    from test_loading import save_diffusers_folder
    from test_lora import _kohya_lora

    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref4 = save_diffusers_folder(tmp_path / "sd", "sd1")
    ref9 = save_diffusers_folder(tmp_path / "inpaint", "sd1", in_channels=9)
    state = _kohya_lora(ref4.unet, ref4.text_encoder)
    g = torch.Generator().manual_seed(5)
    state.update({"lora_unet_conv_in.lora_down.weight": torch.randn(4, 4, 3, 3, generator=g) * 0.3,
                  "lora_unet_conv_in.lora_up.weight": torch.randn(32, 4, 1, 1, generator=g) * 0.3,
                  "lora_unet_conv_in.alpha": torch.tensor(2.0)})
    path = tmp_path / "style.safetensors"
    save_file(state, str(path))
    changes = {}
    for name in ("sd", "inpaint"):
        pipe = TextToImagePipeline.from_pretrained(tmp_path / name)
        w0 = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
        pipe.load_lora(path, 0.8)
        changes[name] = {k: v.double() - w0[k].double() for k, v in pipe.unet.state_dict().items()}
    sd, inpaint = changes["sd"], changes["inpaint"]
    assert inpaint["conv_in.weight"].shape == (32, 9, 3, 3)
    assert inpaint["conv_in.weight"][:, 4:].abs().max() == 0
    want = 0.8 * 2.0 / 4 * (state["lora_unet_conv_in.lora_up.weight"].double().flatten(1)
                            @ state["lora_unet_conv_in.lora_down.weight"].double().flatten(1)).reshape(32, 4, 3, 3)
    assert torch.allclose(inpaint["conv_in.weight"][:, :4], want, atol=1e-5)
    assert torch.allclose(sd["conv_in.weight"], want, atol=1e-5)
    moved = [k for k in sd if k != "conv_in.weight" and sd[k].abs().max() > 0]
    assert len(moved) > 20 and all(torch.allclose(sd[k], inpaint[k], atol=1e-5) for k in moved)
    with pytest.raises(Exception, match="size mismatch"):
        ref9.load_lora_weights(dict(state))
    with pytest.raises(ValueError, match="for a weight of shape"):  # an update of another width is still refused
        bad = dict(state, **{"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 5, 3, 3)})
        save_file(bad, str(tmp_path / "bad.safetensors"))
        TextToImagePipeline.from_pretrained(tmp_path / "inpaint").load_lora(tmp_path / "bad.safetensors")


def test_alpha_pattern_is_read_as_peft_reads_it(tmp_path):
    """diffusers' saved LoraConfig with an alpha_pattern where two patterns match one layer (peft: the first in the
    config's order) and a pattern with `|` (peft: re.match(rf"(.*\\.)?({pattern})$", name)): the merged weights are
    diffusers' load_lora_weights + fuse_lora on the same file (before the fix attn1.to_q took the last pattern, 4,
    and to_k / to_v missed theirs)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_loading import save_diffusers_folder

    from imagine.pipelines.text_to_image import TextToImagePipeline

    ref = save_diffusers_folder(tmp_path / "folder", "sd1")
    cfg = LoraConfig(r=2, lora_alpha=1, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False,
                     alpha_pattern={"attn1.to_q": 16, "to_q": 4, "to_k|to_v": 8})
    torch.manual_seed(0)
    ref.unet.add_adapter(cfg)
    scalings = {name: mod.scaling["default"] for name, mod in ref.unet.named_modules() if hasattr(mod, "scaling")}
    assert {scalings[n] for n in scalings if n.endswith("attn1.to_q")} == {8.0}  # 16 / 2: the first pattern
    assert {scalings[n] for n in scalings if n.endswith("attn2.to_q")} == {2.0}
    assert {scalings[n] for n in scalings if n.endswith(("to_k", "to_v"))} == {4.0}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(ref.unet),
        unet_lora_adapter_metadata=cfg.to_dict(), safe_serialization=True)
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "folder", local_files_only=True,
                                                            safety_checker=None, requires_safety_checker=False)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.5)
    want = {k.replace(".base_layer", ""): v for k, v in ref.unet.state_dict().items() if ".lora_" not in k}
    ours = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.load_lora(path, 0.5)
    moved = [k for k, v in ours.unet.state_dict().items() if not torch.equal(v, before[k])]
    attentions = [n for n, _ in ours.unet.named_modules() if n.endswith((".attn1", ".attn2"))]
    assert len(moved) == 4 * len(attentions) > 0  # to_q, to_k, to_v, to_out.0 of each attention
    for k in moved:
        assert torch.allclose(ours.unet.state_dict()[k], want[k], atol=1e-6, rtol=0), k


def _safetensors_bytes(tensors: dict, metadata: dict | None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata)


def test_lora_hash_takes_kohyas_sshs_model_hash_as_automatic1111_does(tmp_path):
    """AUTOMATIC1111's NetworkOnDisk: metadata 'sshs_model_hash' or the addnet hash (sha256 of what follows the
    header). kohya-ss computes the metadata hash as the addnet hash of the file saved with its ss_* metadata only,
    so on a fresh file the two agree and editing the metadata keeps both; where the metadata's differs (the tensors
    changed after training), A1111 writes the metadata's, and so does imagine now."""
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(8.0).reshape(2, 4),
               "lora_unet_x.lora_up.weight": torch.ones(4, 2), "lora_unet_x.alpha": torch.tensor(1.0)}
    ss = {"ss_network_dim": "2", "ss_network_alpha": "1.0"}
    data = _safetensors_bytes(tensors, ss)
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    fresh = tmp_path / "fresh.safetensors"  # (kohya-ss: the hash of the ss_* file, then user metadata added)
    fresh.write_bytes(_safetensors_bytes(tensors, {**ss, "sshs_model_hash": addnet, "ssmd_title": "a title"}))
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(data)
    assert hashes.lora_hash(fresh) == hashes.lora_hash(plain) == addnet[:12]
    stale = tmp_path / "stale.safetensors"
    stale.write_bytes(_safetensors_bytes({**tensors, "lora_unet_x.alpha": torch.tensor(2.0)},
                                         {**ss, "sshs_model_hash": addnet}))
    assert hashes.file_sha256(stale, addnet=True)[:12] != addnet[:12]
    assert hashes.lora_hash(stale) == addnet[:12]  # (before the fix: the tensors' hash)
    assert hashes.safetensors_metadata(stale)["sshs_model_hash"] == addnet
    pt = tmp_path / "style.pt"  # (no metadata in a pickle: the file's own sha256, as before)
    torch.save(tensors, pt)
    assert hashes.lora_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()[:12]
    broken = tmp_path / "broken.safetensors"  # (a header that is no JSON: hashed as A1111 hashes it)
    broken.write_bytes((4).to_bytes(8, "little") + b"{no}" + b"tail")
    assert hashes.safetensors_metadata(broken) == {} and hashes.lora_hash(broken) == hashlib.sha256(
        b"tail").hexdigest()[:12]
    assert json.loads(json.dumps(hashes.safetensors_metadata(fresh))) == {**ss, "sshs_model_hash": addnet,
                                                                         "ssmd_title": "a title"}


def test_an_embedding_with_several_terms_is_refused_as_automatic1111_refuses_it(tmp_path):
    """AUTOMATIC1111's create_embedding_from_data: "embedding file has multiple terms in it"; one term reads."""
    v = torch.randn(2, 8)
    torch.save({"string_to_param": {"*": v, "+": v * 2}, "name": "two"}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="2 terms"):
        read_embedding_file(tmp_path / "two.pt")
    torch.save({"string_to_param": {"*": v}, "name": "inside"}, tmp_path / "one.pt")
    word, vectors = read_embedding_file(tmp_path / "one.pt")
    assert word is None and torch.equal(vectors, v)  # (the word: the file's name, as in A1111)
