"""DeepFloyd IF's pixel-space cascade (imagine.pipelines.cascade) against diffusers' IFPipeline and
IFSuperResolutionPipeline on the same tiny random weights and generators.

Tiny random diffusers UNet2DConditionModels shaped like IF's (stage I: 3 -> 6 channels, the learned variance, T5 states
projected by text_proj and pooled into the time embedding; stage II: 6 channels in, the noise level as a "timestep"
class embedding), a tiny T5 encoder and a word-level tokenizer built in memory. Ours runs diffusers' own U-Net behind
a small adapter (the cond keys imagine's U-Net takes), so what is checked is the pipeline: text, guidance, DDPM with
the learned variance, the scheduler's thresholding (percentile 0.95, s capped at 1.5), the upsampling, the noise
conditioning augmentation and the draws' order. Pictures must agree to >= 50 dB PSNR and the samples to 1e-4 relative.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from imagine.guidance import dynamic_threshold  # noqa: E402
from imagine.pipelines.cascade import (  # noqa: E402
    IFCascade, IFStage, PromptStates, encode_prompts, preprocess_text, super_resolution, text_to_image,
    thresholding_rule)
from imagine.sampling import sample  # noqa: E402
from imagine.schedules import NoiseSchedule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
T5_DIM = 32
STAGE_1 = dict(  # IF-I's layout, tiny (diffusers' scripts/convert_if.py config)
    sample_size=16, in_channels=3, out_channels=6, block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    cross_attention_dim=32, encoder_hid_dim=T5_DIM, encoder_hid_dim_type="text_proj", attention_head_dim=8,
    addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift", act_fn="gelu", norm_num_groups=8)
STAGE_2 = dict(STAGE_1, sample_size=32, in_channels=6, class_embed_type="timestep")  # IF-II's: the noise level
# IF's scheduler configs (IF-I-XL / IF-II-L scheduler_config.json, image_noising_scheduler)
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
             "variance_type": "learned_range", "thresholding": True, "dynamic_thresholding_ratio": 0.95,
             "sample_max_value": 1.5, "clip_sample": True, "clip_sample_range": 1.0, "prediction_type": "epsilon"}
NOISING = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
WORDS = "a red circle blue square cat dog photo of the on left right with green big small painting".split()
PROMPTS = ["A red circle ", "a photo of a cat on the left"]


def tokenizer():
    """A T5 tokenizer (a Unigram model over whole words as sentencepiece writes them, </s> after the text, <pad> = 0),
    built without files; it saves and loads as T5's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[("\u2581" + w, -1.0 - 0.01 * i)
                                                           for i, w in enumerate(WORDS)], ("\u2581", -5.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                        extra_ids=0)


def t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=len(WORDS) + 4, d_model=T5_DIM, d_kv=8, d_ff=37, num_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0)
    return transformers.T5EncoderModel(cfg).eval()


def unet(config, seed):
    """diffusers' U-Net with its random weights spread out (so that every layer matters at this size), its variance
    output v brought within [-1, 1] as a trained model's is (Improved DDPM eq. 15 interpolates the log variance
    between beta_tilde_t and beta_t with it; far outside, the extrapolated noise scale multiplies diffusers' float32
    rounding of 1 - abar_t near t = 0, 1e-3 relative, into the picture)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
        c = config["out_channels"] // 2
        model.conv_out.weight[c:] *= 0.3
        model.conv_out.bias[c:] *= 0.3
    return model


class Adapter(torch.nn.Module):
    """diffusers' U-Net as a model(x, t, **cond) with the cond keys imagine's U-Net takes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, context=None, context_mask=None, class_labels=None, concat=None):
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        mask = None if context_mask is None else context_mask.to(x.dtype)
        return self.model(x, t, encoder_hidden_states=context, encoder_attention_mask=mask,
                          class_labels=class_labels).sample


@pytest.fixture(scope="module")
def parts():
    from imagine.models.text_encoders import T5TextEncoder

    encoder, tok = t5(), tokenizer()
    first, second = unet(STAGE_1, 1), unet(STAGE_2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_1 = diffusers.IFPipeline(
            tokenizer=tok, text_encoder=encoder, unet=first, scheduler=diffusers.DDPMScheduler(**SCHEDULER),
            safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
        theirs_2 = diffusers.IFSuperResolutionPipeline(
            tokenizer=tok, text_encoder=encoder, unet=second, scheduler=diffusers.DDPMScheduler(**SCHEDULER),
            image_noising_scheduler=diffusers.DDPMScheduler(**NOISING), safety_checker=None, feature_extractor=None,
            watermarker=None, requires_safety_checker=False)
    for p in (theirs_1, theirs_2):
        p.set_progress_bar_config(disable=True)
    ours_encoder = T5TextEncoder(encoder, tok, 77, "tiny-t5")
    ours_1 = IFStage(Adapter(first), SCHEDULER, STAGE_1["sample_size"], encoder=ours_encoder)
    ours_2 = IFStage(Adapter(second), SCHEDULER, STAGE_2["sample_size"], noising_config=NOISING,
                     encoder=ours_encoder)
    return theirs_1, theirs_2, ours_1, ours_2


def psnr(a, b) -> float:
    a = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    b = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def nontrivial(pictures):
    a = np.stack([np.asarray(i) for i in pictures])
    assert 20 < a.std() and 0.05 < ((a > 0) & (a < 255)).mean(), "degenerate test pictures"


KW = dict(clean_caption=False)  # (IF's caption cleaning needs bs4 and ftfy; its rule without them)


# -- stage I ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale,steps", [(1.0, 8), (7.0, 8), (7.0, 100)])
def test_stage_1_is_diffusers(parts, scale, steps):
    theirs_1, _, ours_1, _ = parts
    kw = dict(guidance_scale=scale)
    expected = theirs_1(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                        output_type="pt", **kw, **KW).images
    got = text_to_image(ours_1, PROMPTS, steps=steps, generator=torch.Generator().manual_seed(5), output_type="pt",
                        progress=False, **kw)
    assert rel(got, expected) < TOL
    pictures = theirs_1(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(5), **kw,
                        **KW).images
    ours = text_to_image(ours_1, PROMPTS, steps=steps, seed=5, progress=False, **kw)
    nontrivial(pictures)
    assert [p.size for p in ours] == [(16, 16)] * 2 and psnr(ours, pictures) >= 50


def test_stage_1_per_image_generators_negatives_and_copies(parts):
    """One generator per image (diffusers' list of generators), a negative prompt each and two images per prompt."""
    theirs_1, _, ours_1, _ = parts
    kw = dict(negative_prompt=["blue square", "a dog"], num_images_per_prompt=2, guidance_scale=5.0)
    expected = theirs_1(PROMPTS, num_inference_steps=6, generator=gens([1, 2, 3, 4]), **kw, **KW).images
    got = text_to_image(ours_1, PROMPTS, steps=6, generator=gens([1, 2, 3, 4]), progress=False, **kw)
    assert len(got) == 4 and psnr(got, expected) >= 50
    # each image is the one its generator gives alone
    alone = text_to_image(ours_1, PROMPTS[1], "a dog", steps=6, generator=gens([4]), guidance_scale=5.0,
                          progress=False)
    assert psnr(alone, got[3:]) >= 50


def test_text_is_read_as_if_reads_it(parts):
    theirs_1, _, ours_1, _ = parts
    assert preprocess_text(["  A Red CIRCLE  ", "x"]) == ["a red circle", "x"]
    ours = encode_prompts(ours_1.encoder, PROMPTS, "Blue square")
    cond, uncond = theirs_1.encode_prompt(PROMPTS, negative_prompt=["Blue square"] * 2, **KW)
    assert ours.cond.shape == (2, 77, T5_DIM)
    assert rel(ours.cond, cond) < TOL and rel(ours.uncond, uncond) < TOL
    default = encode_prompts(ours_1.encoder, PROMPTS)  # the negative prompt "" by default
    assert rel(default.uncond, theirs_1.encode_prompt(PROMPTS, **KW)[1]) < TOL


def test_thresholding_read_from_the_scheduler_config():
    assert thresholding_rule(SCHEDULER) == {"thresholding": "dynamic", "threshold_percentile": 0.95,
                                            "threshold_max": 1.5}
    assert thresholding_rule({"clip_sample_range": 2.0}) == {"thresholding": "static", "threshold_range": 2.0}
    assert thresholding_rule({"clip_sample": False}) == {}


# -- stage II ---------------------------------------------------------------------------------------------------------
LOW = torch.Generator().manual_seed(9)
PICTURES = (torch.rand((2, 3, 16, 16), generator=LOW) * 2.4 - 1.2)  # (stage I's "pt" output is not clamped)


@pytest.mark.parametrize("scale,level", [(1.0, 250), (4.0, 250), (6.0, 100)])
def test_stage_2_is_diffusers(parts, scale, level):
    _, theirs_2, _, ours_2 = parts
    kw = dict(guidance_scale=scale, noise_level=level)
    expected = theirs_2(PROMPTS, image=PICTURES, num_inference_steps=8, generator=torch.Generator().manual_seed(3),
                        output_type="pt", **kw, **KW).images
    got = super_resolution(ours_2, PROMPTS, PICTURES, steps=8, generator=torch.Generator().manual_seed(3),
                           output_type="pt", progress=False, **kw)
    assert got.shape == (2, 3, 32, 32) and rel(got, expected) < TOL
    pictures = theirs_2(PROMPTS, image=PICTURES, num_inference_steps=8, generator=torch.Generator().manual_seed(3),
                        **kw, **KW).images
    ours = super_resolution(ours_2, PROMPTS, PICTURES, steps=8, seed=3, progress=False, **kw)
    nontrivial(pictures)
    assert psnr(ours, pictures) >= 50


def test_stage_2_pil_pictures_per_image_generators(parts):
    """PIL pictures in, one generator per image, two images per prompt, a size other than the stage's default."""
    _, theirs_2, _, ours_2 = parts
    from imagine.images import to_pil

    pil = [to_pil(p) for p in PICTURES]
    kw = dict(num_images_per_prompt=2, guidance_scale=3.0, height=24, width=40)
    expected = theirs_2(PROMPTS, image=pil, num_inference_steps=5, generator=gens([7, 8, 9, 10]), **kw, **KW).images
    got = super_resolution(ours_2, PROMPTS, pil, steps=5, generator=gens([7, 8, 9, 10]), progress=False, **kw)
    assert [p.size for p in got] == [(40, 24)] * 4 and psnr(got, expected) >= 50


def test_augmentation_matters(parts):
    """The noise level reaches the U-Net and the picture: another level gives another image."""
    _, _, _, ours_2 = parts
    a, b = (super_resolution(ours_2, PROMPTS, PICTURES, steps=3, seed=1, noise_level=n, output_type="pt",
                             progress=False) for n in (0, 500))
    assert float((a - b).abs().max()) > 1e-2


# -- the cascade ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scales", [(1.0, 1.0), (7.0, 4.0)])
def test_cascade_is_diffusers_chained_with_one_generator(parts, scales):
    """diffusers' IF documentation: encode_prompt once, one generator passed to stage I (output_type "pt") and then to
    stage II."""
    theirs_1, theirs_2, ours_1, ours_2 = parts
    g = torch.Generator().manual_seed(11)
    cond, uncond = theirs_1.encode_prompt(PROMPTS, **KW)
    low = theirs_1(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=6, generator=g,
                   guidance_scale=scales[0], output_type="pt").images
    expected = theirs_2(image=low, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=5,
                        generator=g, guidance_scale=scales[1], noise_level=200).images
    cascade = IFCascade(ours_1, ours_2)
    got = cascade(PROMPTS, steps=(6, 5), guidance_scale=scales, noise_level=200, seed=11, progress=False)
    nontrivial(expected)
    assert [p.size for p in got] == [(32, 32)] * 2 and psnr(got, expected) >= 50


# -- the folder loader -----------------------------------------------------------------------------------------------
def test_stages_load_from_diffusers_folders(parts, tmp_path):
    """IFStage.from_pretrained on the folders diffusers saves: imagine's U-Net from unet/ (IF's block types), T5 from
    text_encoder/ and tokenizer/, the schedulers' configs; stage II with stage I's encoder, as IFCascade loads it."""
    theirs_1, theirs_2, _, _ = parts
    theirs_1.save_pretrained(tmp_path / "one")
    theirs_2.save_pretrained(tmp_path / "two")
    from imagine.models.unet import UNet2DConditionModel

    cascade = IFCascade.from_pretrained(tmp_path / "one", tmp_path / "two")
    first, second = cascade.stage_1, cascade.stage_2
    assert isinstance(first.model, UNet2DConditionModel) and isinstance(second.model, UNet2DConditionModel)
    assert (first.sample_size, first.channels, second.sample_size, second.channels) == (16, 3, 32, 3)
    assert second.super_resolution and second.encoder is first.encoder
    expected = theirs_1(PROMPTS, num_inference_steps=6, generator=torch.Generator().manual_seed(5),
                        guidance_scale=7.0, output_type="pt", **KW).images
    got = text_to_image(first, PROMPTS, steps=6, seed=5, guidance_scale=7.0, output_type="pt", progress=False)
    assert rel(got, expected) < TOL
    expected = theirs_2(PROMPTS, image=PICTURES, num_inference_steps=5, generator=torch.Generator().manual_seed(3),
                        output_type="pt", **KW).images
    got = super_resolution(second, PROMPTS, PICTURES, steps=5, seed=3, output_type="pt", progress=False)
    assert rel(got, expected) < TOL
    with pytest.raises(ValueError, match="is not a diffusers IF folder: it needs unet/ and scheduler/"):
        IFStage.from_pretrained(tmp_path / "one" / "unet")


# -- the threshold cap ------------------------------------------------------------------------------------------------
def test_dynamic_threshold_cap_is_ddpm_schedulers():
    """s clamped to [1, sample_max_value] as diffusers' DDPMScheduler(thresholding=True) clamps it: samples whose
    percentile is below 1, between 1 and the cap, and above it."""
    scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((4, 3, 8, 8), generator=g) * torch.tensor([0.3, 0.8, 1.2, 4.0]).view(4, 1, 1, 1)
    expected = scheduler._threshold_sample(x0.clone())
    got = dynamic_threshold(x0, 0.95, max_value=1.5)
    assert rel(got, expected) < 1e-6
    assert float((dynamic_threshold(x0, 0.95) - expected).abs().max()) > 1e-2  # (the cap matters for the last)
    # R carries it to data in [-R, R]: the rule on x_0 / R, times R
    torch.testing.assert_close(dynamic_threshold(2 * x0, 0.95, bound=2.0, max_value=1.5), 2 * expected)


def test_sample_with_the_cap_is_ddpm_scheduler(parts):
    """`sample(..., thresholding="dynamic", threshold_max=1.5)` against DDPMScheduler(thresholding=True,
    sample_max_value=1.5) stepping the same model (IF's stage I U-Net, its learned variance) from the same noise."""
    theirs_1, _, ours_1, _ = parts
    model = ours_1.model
    context = torch.randn((2, 5, T5_DIM), generator=torch.Generator().manual_seed(2))
    scheduler = diffusers.DDPMScheduler(**SCHEDULER)
    steps = 10
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(4)
    x = torch.randn((2, 3, 16, 16), generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t, context=context), t, x, generator=g).prev_sample
    schedule = NoiseSchedule.from_diffusers_config(SCHEDULER)
    kw = dict(schedule=schedule, sampler="ddpm", steps=steps, cond={"context": context}, progress=False,
              thresholding="dynamic", threshold_percentile=0.95)
    got = sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(4), threshold_max=1.5, **kw)
    assert rel(got, x) < TOL
    uncapped = sample(model, (2, 3, 16, 16), generator=torch.Generator().manual_seed(4), **kw)
    assert float((uncapped - x).abs().max()) > 1e-2


@pytest.mark.parametrize("bad", [0.5, -1.0, float("inf"), "big", True])
def test_bad_threshold_max_is_refused(bad):
    with pytest.raises(ValueError, match="threshold_max must be None .* finite number >= 1"):
        dynamic_threshold(torch.zeros(1, 3), max_value=bad)


def test_threshold_max_needs_dynamic_thresholding():
    schedule = NoiseSchedule.from_diffusers_config(SCHEDULER)
    with pytest.raises(ValueError, match="threshold_max caps dynamic thresholding.*thresholding='static'"):
        sample(lambda x, t: torch.cat([x, x], 1), (1, 3, 4, 4), schedule=schedule, sampler="ddpm", steps=2,
               thresholding="static", threshold_max=1.5, progress=False)


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_input_is_named(parts):
    _, _, ours_1, ours_2 = parts
    run = dict(steps=2, progress=False)
    with pytest.raises(ValueError, match=r"noise_level must be a whole number from 0 to 999"):
        super_resolution(ours_2, PROMPTS, PICTURES, noise_level=1000, **run)
    with pytest.raises(ValueError, match="3 pictures for 2 prompts"):
        super_resolution(ours_2, PROMPTS, torch.zeros(3, 3, 16, 16), **run)
    with pytest.raises(ValueError, match=r"image tensors must be \[B, 3, h, w\]"):
        super_resolution(ours_2, PROMPTS, torch.zeros(2, 4, 16, 16), **run)
    with pytest.raises(TypeError, match="image must be a PIL picture"):
        super_resolution(ours_2, PROMPTS, ["not a picture", "x"], **run)
    with pytest.raises(ValueError, match="is a super-resolution stage"):
        text_to_image(ours_2, PROMPTS, **run)
    with pytest.raises(ValueError, match="is not a super-resolution stage"):
        super_resolution(ours_1, PROMPTS, PICTURES, **run)
    with pytest.raises(ValueError, match="output_type must be one of 'pil', 'pt'"):
        text_to_image(ours_1, PROMPTS, output_type="np", **run)
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        text_to_image(ours_1, PROMPTS, ["a", "b", "c"], **run)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        text_to_image(ours_1, PROMPTS, generator=gens([1, 2, 3]), **run)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        text_to_image(ours_1, PROMPTS, guidance_scale=float("nan"), **run)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        text_to_image(ours_1, PROMPTS, steps=0, progress=False)
    with pytest.raises(ValueError, match="steps must be a pair"):
        IFCascade(ours_1, ours_2)(PROMPTS, steps=4)
    no_text = IFStage(ours_2.model, SCHEDULER, 32, noising_config=NOISING)
    with pytest.raises(ValueError, match="has no text encoder: give PromptStates"):
        super_resolution(no_text, PROMPTS, PICTURES, **run)
    states = encode_prompts(ours_1.encoder, PROMPTS)
    assert isinstance(states, PromptStates)
    out = super_resolution(no_text, states, PICTURES, output_type="pt", **run)
    assert out.shape == (2, 3, 32, 32)
