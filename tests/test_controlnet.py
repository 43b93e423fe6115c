"""ControlNet (Zhang et al. 2023; imagine.models.controlnet): the copy of the U-Net's contracting path reads the
control picture and adds its zero-convolved features to the U-Net's skips and bottleneck. Checked against
diffusers on the same tiny random weights: ControlNetModel's residuals exactly, the U-Net with them, and the whole
StableDiffusionControlNetPipeline image (one and two ControlNets, SD and SDXL) to 50 dB."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_loading import TEXT_WIDTH, save_diffusers_folder  # noqa: E402
from test_sd_parity import CFG, NEGATIVE, PROMPT, SEED, SIZE, psnr  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from imagine.models.controlnet import ControlNetModel  # noqa: E402
from imagine.models.unet import UNet2DConditionModel  # noqa: E402
from imagine.pipelines.text_to_image import TextToImagePipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_controlnet(seed: int = 5, **kw):
    """A diffusers ControlNetModel for test_loading's "sd1" U-Net (the tiny VAE scales by 2: one stride-2 step in
    the picture's encoder), its zero convolutions made non-zero so that they matter."""
    torch.manual_seed(seed)
    cfg = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=TEXT_WIDTH,
               norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               conditioning_embedding_out_channels=(8, 16))
    net = diffusers.ControlNetModel(**{**cfg, **kw}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def _reference(pipe_ref, **kw) -> torch.Tensor:
    """diffusers' image [3, H, W] in [0, 1] for PROMPT / NEGATIVE at CFG and SEED, with the pipeline's own inputs."""
    pipe_ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe_ref(PROMPT, negative_prompt=NEGATIVE, guidance_scale=CFG,
                        generator=torch.Generator().manual_seed(SEED), output_type="pt", **kw).images[0].float()


def _edges(size: int = SIZE, seed: int = 0) -> Image.Image:
    """A control picture: white strokes on black, as an edge map is."""
    a = np.zeros((size, size, 3), np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        r, c = rng.integers(0, size, 2)
        a[r, :] = 255
        a[:, c] = 255
    return Image.fromarray(a)


def test_residuals_and_the_unet_with_them_match_diffusers():
    ref = tiny_controlnet(global_pool_conditions=False)
    ours = ControlNetModel.from_config_dict(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    unet_ref = save_diffusers_folder.__globals__["tiny_diffusers_parts"]("sd1")[0]
    unet = UNet2DConditionModel(dict(unet_ref.config)).eval()
    unet.load_state_dict(unet_ref.state_dict())
    g = torch.Generator().manual_seed(2)
    x, ctx, c = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, TEXT_WIDTH, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        d, m = ref(x, t, ctx, controlnet_cond=c, conditioning_scale=0.7, return_dict=False)
        d2, m2 = ours(x, t, ctx, control=c, scale=0.7)
        assert len(d) == len(d2) and all(torch.equal(a, b) for a, b in zip(d, d2)) and torch.equal(m, m2)
        want = unet_ref(x, t, ctx, down_block_additional_residuals=d, mid_block_additional_residual=m).sample
        got = unet(x, t, context=ctx, down_block_additional_residuals=d2, mid_block_additional_residual=m2)
        assert float((got - want).norm() / want.norm()) < 1e-6
        assert float((got - unet(x, t, context=ctx)).norm() / want.norm()) > 1e-2  # the residuals matter
    # bgr pictures and pooled residuals follow their config
    for kw in ({"controlnet_conditioning_channel_order": "bgr"}, {"global_pool_conditions": True}):
        ref2 = tiny_controlnet(**kw)
        ours2 = ControlNetModel.from_config_dict(dict(ref2.config)).eval()
        ours2.load_state_dict(ref2.state_dict())
        with torch.no_grad():
            d, m = ref2(x, t, ctx, controlnet_cond=c, return_dict=False)
            d2, m2 = ours2(x, t, ctx, control=c)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(d, d2)) and torch.allclose(m, m2, atol=1e-6)


def _setup(tmp_path, scheduler, n=1):
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler=scheduler)
    nets = [tiny_controlnet(seed=5 + i) for i in range(n)]
    for i, net in enumerate(nets):
        net.save_pretrained(tmp_path / f"cn{i}", safe_serialization=True)
    return ref, nets


@pytest.mark.parametrize("sampler,scale,steps", [("dpmpp_2m", 1.0, 10), ("euler", 0.6, 8)])
def test_generation_matches_diffusers(tmp_path, sampler, scale, steps):
    ref, (net,) = _setup(tmp_path, sampler)
    pipe_ref = diffusers.StableDiffusionControlNetPipeline(**ref.components, controlnet=net)
    want = _reference(pipe_ref, image=_edges(), num_inference_steps=steps, controlnet_conditioning_scale=scale)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", controlnets=[tmp_path / "cn0"])
    res = pipe.generate(PROMPT, NEGATIVE, control_image=_edges(), controlnet_scale=scale, steps=steps,
                        guidance_scale=CFG, sampler=sampler, seed=SEED, progress=False, output_type="latent")
    got = ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1)
    assert res.parameters["controlnet"] == f"cn0: {scale:g}" and (res.parameters["width"], res.parameters["height"]) == (SIZE, SIZE)
    assert psnr(got, want) >= 50
    plain = pipe.generate(PROMPT, NEGATIVE, steps=steps, guidance_scale=CFG, sampler=sampler, seed=SEED,
                          progress=False, output_type="latent")
    assert float((plain.latents - res.latents).abs().mean()) > 1e-3  # without a picture the ControlNet is not used


def test_two_controlnets_match_diffusers_multicontrolnet(tmp_path):
    ref, nets = _setup(tmp_path, "ddim", n=2)
    pipe_ref = diffusers.StableDiffusionControlNetPipeline(**ref.components, controlnet=nets)
    pictures, scales = [_edges(seed=1), _edges(seed=2)], [0.8, 0.5]
    want = _reference(pipe_ref, image=pictures, num_inference_steps=8, controlnet_conditioning_scale=scales)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    assert [pipe.load_controlnet(tmp_path / "cn0", "edges"), pipe.load_controlnet(tmp_path / "cn1")] == ["edges", "cn1"]
    res = pipe.generate(PROMPT, NEGATIVE, control_image=pictures, controlnet_scale=scales, steps=8, guidance_scale=CFG,
                        sampler="ddim", seed=SEED, progress=False, output_type="latent")
    assert psnr(((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), want) >= 50
    assert res.parameters["controlnet"] == "edges: 0.8, cn1: 0.5"


def test_an_images_result_does_not_depend_on_its_batch_and_fast_mode_runs(tmp_path):
    _setup(tmp_path, "ddim")
    pics = [_edges(seed=1), _edges(seed=2), _edges(seed=3)]
    for precision in ("exact", "fast"):
        pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", precision=precision, controlnets=[tmp_path / "cn0"])
        kw = dict(steps=4, progress=False, output_type="latent", sampler="euler_a")
        batch = pipe.generate(["a", "b", "c"], control_image=pics, seeds=[7, 8, 9], **kw).latents
        alone = pipe.generate("b", control_image=pics[1], seed=8, **kw).latents
        assert torch.allclose(batch[1:2], alone, atol=1e-5 if precision == "exact" else 2e-2), precision


def test_bad_inputs_are_clear_errors(tmp_path):
    _setup(tmp_path, "ddim")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder")
    with pytest.raises(ValueError, match="no ControlNet is loaded"):
        pipe.generate("x", control_image=_edges(), steps=2, progress=False)
    pipe.load_controlnet(tmp_path / "cn0")
    with pytest.raises(ValueError, match="a ControlNet named 'cn0' is loaded already"):
        pipe.load_controlnet(tmp_path / "cn0", "cn0")  # a name given twice
    with pytest.raises(ValueError, match=r"controlnet_scale must be a finite number or one per ControlNet \(1\)"):
        pipe.generate("x", control_image=_edges(), controlnet_scale=[1, 2], steps=2, progress=False)
    with pytest.raises(ValueError, match="2 control pictures for 3 prompts"):
        pipe.generate(["a", "b", "c"], control_image=[_edges(), _edges()], steps=2, progress=False)
    other = tiny_controlnet(cross_attention_dim=32)
    with pytest.raises(ValueError, match="its cross_attention_dim is 32, this model's U-Net has 64"):
        pipe.load_controlnet(ControlNetModel.from_config_dict(dict(other.config)), "other")


def test_sdxl_controlnet_matches_diffusers(tmp_path):
    """An SDXL ControlNet (text_time embedding too) with StableDiffusionXLControlNetPipeline: 50 dB."""
    from test_sdxl import save_sdxl_folder

    ref = save_sdxl_folder(tmp_path / "folder", scheduler="euler")
    u = ref.unet.config
    torch.manual_seed(9)
    net = diffusers.ControlNetModel(
        block_out_channels=u.block_out_channels, layers_per_block=u.layers_per_block, norm_num_groups=32,
        down_block_types=u.down_block_types, transformer_layers_per_block=u.transformer_layers_per_block,
        attention_head_dim=u.attention_head_dim, use_linear_projection=True, cross_attention_dim=u.cross_attention_dim,
        addition_embed_type="text_time", addition_time_embed_dim=u.addition_time_embed_dim,
        projection_class_embeddings_input_dim=u.projection_class_embeddings_input_dim,
        conditioning_embedding_out_channels=(8, 16)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net.save_pretrained(tmp_path / "cn", safe_serialization=True)
    pipe_ref = diffusers.StableDiffusionXLControlNetPipeline(**ref.components, controlnet=net)
    want = _reference(pipe_ref, image=_edges(), num_inference_steps=8, controlnet_conditioning_scale=0.8)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", controlnets=[tmp_path / "cn"])
    res = pipe.generate(PROMPT, NEGATIVE, control_image=_edges(), controlnet_scale=0.8, steps=8, guidance_scale=CFG,
                        seed=SEED, progress=False, output_type="latent")
    assert psnr(((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), want) >= 50


def test_controlnet_inpainting_matches_diffusers(tmp_path):
    """A ControlNet with an inpainting model (9-channel U-Net): the ControlNet sees the noisy latents alone
    (StableDiffusionControlNetInpaintPipeline, whose own default scale is 0.5: given here)."""
    from test_inpainting import _mask, _picture

    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="dpmpp_2m", in_channels=9)
    net = tiny_controlnet()
    net.save_pretrained(tmp_path / "cn", safe_serialization=True)
    pipe_ref = diffusers.StableDiffusionControlNetInpaintPipeline(**ref.components, controlnet=net)
    pipe_ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe_ref(PROMPT, image=_picture(), mask_image=_mask(), control_image=_edges(), negative_prompt=NEGATIVE,
                        controlnet_conditioning_scale=1.0, num_inference_steps=8, guidance_scale=CFG, generator=[torch.Generator().manual_seed(SEED)],
                        output_type="pt").images[0].float()
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", controlnets=[tmp_path / "cn"])
    res = pipe.generate(PROMPT, NEGATIVE, init_image=_picture(), mask_image=_mask(), control_image=_edges(), steps=8,
                        guidance_scale=CFG, sampler="dpmpp_2m", seed=SEED, progress=False, output_type="latent")
    assert psnr(((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), want) >= 50


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_the_guidance_window_matches_diffusers(tmp_path, sampler):
    """control_guidance_start / end: the ControlNet acts on the evaluations k of n with start <= k/n, (k+1)/n <= end
    (Heun: n = 2N - 1, diffusers' doubled timesteps)."""
    ref, (net,) = _setup(tmp_path, sampler)
    pipe_ref = diffusers.StableDiffusionControlNetPipeline(**ref.components, controlnet=net)
    want = _reference(pipe_ref, image=_edges(), num_inference_steps=10, control_guidance_start=0.2,
                      control_guidance_end=0.7)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", controlnets=[tmp_path / "cn0"])
    kw = dict(steps=10, guidance_scale=CFG, sampler=sampler, seed=SEED, progress=False, output_type="latent")
    res = pipe.generate(PROMPT, NEGATIVE, control_image=_edges(), control_guidance_start=0.2,
                        control_guidance_end=0.7, **kw)
    assert psnr(((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), want) >= 50
    assert res.parameters["controlnet"] == "cn0: 1 (0.2-0.7)"
    whole = pipe.generate(PROMPT, NEGATIVE, control_image=_edges(), **kw)
    assert float((whole.latents - res.latents).abs().mean()) > 1e-3
    with pytest.raises(ValueError, match=r"control_guidance_start \(0.8\) must be below control_guidance_end \(0.5\)"):
        pipe.generate("x", control_image=_edges(), control_guidance_start=0.8, control_guidance_end=0.5, steps=2)
    with pytest.raises(ValueError, match=r"control_guidance_end must be a finite number in \[0, 1\]"):
        pipe.generate("x", control_image=_edges(), control_guidance_end=1.5, steps=2)


def test_a_pooled_controlnet_reads_the_prompt_only(tmp_path):
    """A shuffle-style ControlNet (global_pool_conditions): diffusers runs it in guess mode, on the conditional half
    of the guidance batch with zero residuals for the unconditional half; 50 dB."""
    ref = save_diffusers_folder(tmp_path / "folder", "sd1", scheduler="ddim")
    net = tiny_controlnet(global_pool_conditions=True)
    net.save_pretrained(tmp_path / "cn", safe_serialization=True)
    pipe_ref = diffusers.StableDiffusionControlNetPipeline(**ref.components, controlnet=net)
    want = _reference(pipe_ref, image=_edges(), num_inference_steps=8)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", controlnets=[tmp_path / "cn"])
    res = pipe.generate(PROMPT, NEGATIVE, control_image=_edges(), steps=8, guidance_scale=CFG, sampler="ddim",
                        seed=SEED, progress=False, output_type="latent")
    assert psnr(((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), want) >= 50


def test_settings_without_their_pictures_and_unusable_controlnets_are_errors(tmp_path):
    _setup(tmp_path, "ddim")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", controlnets=[tmp_path / "cn0"])
    with pytest.raises(ValueError, match="need control_image"):
        pipe.generate("x", controlnet_scale=0.3, steps=2, progress=False)
    grey = tiny_controlnet(conditioning_channels=1)
    with pytest.raises(ValueError, match="takes 1-channel control pictures; imagine gives ControlNets RGB pictures"):
        pipe.load_controlnet(ControlNetModel.from_config_dict(dict(grey.config)), "grey")


def test_one_controlnet_with_two_pictures_shares_its_model(tmp_path):
    """The same file twice (diffusers' MultiControlNet and A1111's units allow it): named name and name#2, one model
    in memory, and the image of diffusers' MultiControlNet of the same model twice; a diffusers-named file takes its
    folder's name."""
    ref, (net,) = _setup(tmp_path, "ddim")
    pipe_ref = diffusers.StableDiffusionControlNetPipeline(**ref.components, controlnet=[net, net])
    pictures, scales = [_edges(seed=1), _edges(seed=2)], [0.5, 1.0]
    want = _reference(pipe_ref, image=pictures, num_inference_steps=6, controlnet_conditioning_scale=scales)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", controlnets=[tmp_path / "cn0", tmp_path / "cn0"])
    assert [n for n, _ in pipe.controlnets] == ["cn0", "cn0#2"] and pipe.controlnets[0][1] is pipe.controlnets[1][1]
    res = pipe.generate(PROMPT, NEGATIVE, control_image=pictures, controlnet_scale=scales, steps=6, guidance_scale=CFG,
                        sampler="ddim", seed=SEED, progress=False, output_type="latent")
    assert psnr(((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), want) >= 50
    assert pipe.load_controlnet(tmp_path / "cn0" / "diffusion_pytorch_model.safetensors") == "cn0#3"


def test_guess_mode_matches_diffusers_and_a1111s_modes_scale_the_levels(tmp_path):
    """diffusers' guess_mode (the conditional rows only, logspace(-1, 0) up the residuals): 50 dB against its
    pipeline. AUTOMATIC1111's "My prompt is more important" scales the residuals by 0.825 ** (12 - i) on both halves
    and "ControlNet is more important" also leaves the unconditional rows alone: checked on the residuals the U-Net
    receives."""
    from imagine.models.controlnet import Controlled

    ref, nets = _setup(tmp_path, "ddim")
    pipe_ref = diffusers.StableDiffusionControlNetPipeline(**ref.components, controlnet=nets[0])
    want = _reference(pipe_ref, image=_edges(), num_inference_steps=8, guess_mode=True)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "folder", controlnets=[tmp_path / "cn0"])
    res = pipe.generate(PROMPT, NEGATIVE, control_image=_edges(), guess_mode=True, steps=8, guidance_scale=CFG,
                        sampler="ddim", seed=SEED, progress=False, output_type="latent")
    assert psnr(((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), want) >= 50
    assert res.parameters["control_mode"] == ["guess"]

    seen = []

    def unet(x, t, down_block_additional_residuals=None, mid_block_additional_residual=None, **cond):
        seen.append([*down_block_additional_residuals, mid_block_additional_residual])
        return x

    net = pipe.controlnets[0][1]
    picture = pipe._pixels([_edges()], SIZE, SIZE, normalize=False)
    x, t = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0])
    context = pipe.text_encoder.encode([NEGATIVE, PROMPT]).states
    for mode in ("balanced", "prompt", "controlnet"):
        Controlled(unet, [(net, picture, 0.7, (0.0, 1.0), mode)])(x, t, context=context)
    balanced, prompt, control = seen
    factors = [0.825 ** float(12 - i) for i in range(13)][:len(balanced)]
    for b, p, c, f in zip(balanced, prompt, control, factors):
        assert torch.allclose(p, b * f, rtol=1e-5, atol=1e-7)
        # (the conditional rows alone are another batch for the net: equal to rounding)
        assert torch.equal(c[:1], torch.zeros_like(c[:1])) and torch.allclose(c[1:], (b * f)[1:], rtol=0, atol=1e-5)
