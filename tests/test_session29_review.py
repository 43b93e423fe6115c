"""Review of session 29's DeepFloyd IF cascade (imagine.pipelines.cascade, `imagine generate --stage-2`) on inputs its
tests did not try, against diffusers' IFPipeline / IFSuperResolutionPipeline on the same tiny random weights
(test_cascade_if_s29's): stage II with a negative prompt each and several images per prompt from one generator,
PIL pictures of another size than stage I's, the noise levels at the ends of the range, a size neither square nor a
multiple of 8; the cascade with a negative prompt each and two images per prompt; the CLI with --from-file into a
relative folder; and bad input named (an empty prompt list, a size of 0, 8-bit image tensors, --infotext) and stage
II's settings checked before stage I runs (the API's and the CLI's)."""

from __future__ import annotations

import pytest
import torch

from test_cascade_cli_s29 import _run, folders  # noqa: F401 (fixture)
from test_cascade_if_s29 import KW, PICTURES, PROMPTS, parts, rel  # noqa: F401 (fixture)

from imagine.pipelines.cascade import IFCascade, super_resolution, text_to_image  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4


def _pil(x):
    from imagine.images import to_pil

    return [to_pil(p) for p in x]


@pytest.mark.parametrize("case", ["negatives_and_copies", "pil_of_another_size", "level_0", "level_999",
                                  "odd_size"])
def test_stage_2_on_untried_inputs_is_diffusers(parts, case):
    """One generator for the batch throughout (diffusers' single generator: one draw for the whole batch)."""
    _, theirs_2, _, ours_2 = parts
    image, kw = PICTURES, {}
    if case == "negatives_and_copies":
        kw = dict(negative_prompt=["blue square", "a dog"], num_images_per_prompt=2, guidance_scale=5.0)
    elif case == "pil_of_another_size":  # (stage I's pictures are 16 px; these 12 x 20, upsampled to 32 all the same)
        image = _pil(torch.nn.functional.interpolate(PICTURES, (12, 20), mode="bilinear"))
    elif case.startswith("level_"):
        kw = dict(noise_level=int(case[6:]))
    else:  # (diffusers takes any size its U-Net's levels divide: 2 here)
        kw = dict(height=18, width=30)
    expected = theirs_2(PROMPTS, image=image, num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                        output_type="pt", **kw, **KW).images
    got = super_resolution(ours_2, PROMPTS, image, steps=3, generator=torch.Generator().manual_seed(3),
                           output_type="pt", progress=False, **kw)
    assert got.shape == expected.shape and rel(got, expected) < TOL


def test_an_empty_prompt_list_is_named(parts):
    """[] reached T5's tokenizer (IndexError: list index out of range); diffusers' IFPipeline fails on it too."""
    _, _, ours_1, ours_2 = parts
    with pytest.raises(ValueError, match="give at least one prompt"):
        text_to_image(ours_1, [], steps=1, progress=False)
    with pytest.raises(ValueError, match="give at least one prompt"):
        IFCascade(ours_1, ours_2)([], steps=(1, 1), progress=False)


@pytest.mark.parametrize("side", ["height", "width"])
def test_a_size_of_0_is_refused(parts, side):
    """height=0 ran at the stage's default size (0 read as "not given"): the size is a positive int."""
    _, _, ours_1, ours_2 = parts
    with pytest.raises(ValueError, match=f"{side} must be a positive int .*got 0"):
        text_to_image(ours_1, PROMPTS, steps=1, progress=False, **{side: 0})
    with pytest.raises(ValueError, match=f"{side} must be a positive int .*got 0"):
        super_resolution(ours_2, PROMPTS, PICTURES, steps=1, progress=False, **{side: 0})


def test_8_bit_image_tensors_are_refused(parts):
    """A uint8 tensor of pixels (0..255) was taken as values in [-1, 1]; its PIL pictures are read as diffusers reads
    them."""
    _, theirs_2, _, ours_2 = parts
    pixels = ((PICTURES.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    with pytest.raises(ValueError, match="image tensors must be floating point in \\[-1, 1\\]; got torch.uint8"):
        super_resolution(ours_2, PROMPTS, pixels, steps=1, progress=False)
    pil = _pil(pixels.float() / 127.5 - 1)
    expected = theirs_2(PROMPTS, image=pil, num_inference_steps=2, generator=torch.Generator().manual_seed(1),
                        output_type="pt", **KW).images
    got = super_resolution(ours_2, PROMPTS, pil, steps=2, seed=1, output_type="pt", progress=False)
    assert rel(got, expected) < TOL


def test_cli_infotext_on_a_cascade_is_named(folders, tmp_path, capsys):
    """A cascade picture's own record given to --infotext was refused as "--height, --infotext, --sampler, --width:
    not for a pixel cascade", flags the user never gave (the record's values)."""
    one, two = folders
    code, _, err = _run(capsys, "--model", one, "--stage-2", two, "a cat", "--steps", 2, "--stage-2-steps", 2,
                        "--seed", 4, "-o", tmp_path / "a.png", "-q")
    assert code == 0, err
    code, _, err = _run(capsys, "--model", one, "--stage-2", two, "--infotext", tmp_path / "a.png",
                        "-o", tmp_path / "b.png", "-q")
    assert code != 0 and "a pixel cascade (DeepFloyd IF) is not run again from a picture's parameters" in err
    assert "--height" not in err and not (tmp_path / "b.png").exists()


def test_cascade_with_negatives_and_copies_is_diffusers_chained(parts):
    """A negative prompt each and two images per prompt through both stages, one generator: diffusers' chained
    pipelines given encode_prompt's states for the four images."""
    theirs_1, theirs_2, ours_1, ours_2 = parts
    negatives = ["blue square", "a dog"]
    cond, uncond = theirs_1.encode_prompt(PROMPTS, negative_prompt=negatives, num_images_per_prompt=2, **KW)
    g = torch.Generator().manual_seed(11)
    low = theirs_1(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3, generator=g,
                   output_type="pt").images
    expected = theirs_2(image=low, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=3,
                        generator=g, noise_level=100, output_type="pt").images
    got = IFCascade(ours_1, ours_2)(PROMPTS, negatives, steps=(3, 3), noise_level=100, num_images_per_prompt=2,
                                    seed=11, output_type="pt", progress=False)
    assert got.shape == (4, 3, 32, 32) and rel(got, expected) < TOL


def test_cli_from_file_into_a_relative_folder(parts, folders, tmp_path, capsys, monkeypatch):
    """--from-file's prompts, -o a folder given relative to the working directory: numbered pictures there, each its
    own seed's (base + k) through both stages, as diffusers' chained pipelines make it."""
    from PIL import Image

    from test_cascade_if_s29 import psnr

    theirs_1, theirs_2, _, _ = parts
    one, two = folders
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a red circle\nA photo of a cat\n")
    code, _, err = _run(capsys, "--model", one, "--stage-2", two, "--from-file", "prompts.txt", "--steps", 3,
                        "--stage-2-steps", 2, "--seed", 5, "-n", "blue square", "-o", "out/if", "-q")
    assert code == 0, err
    files = sorted((tmp_path / "out" / "if").glob("*.png"))
    assert [f.name for f in files] == ["00000-5.png", "00001-6.png"]
    for f, prompt, seed in zip(files, ("a red circle", "A photo of a cat"), (5, 6)):
        g = torch.Generator().manual_seed(seed)
        low = theirs_1(prompt, negative_prompt="blue square", num_inference_steps=3, generator=g, output_type="pt",
                       **KW).images
        want = theirs_2(prompt, image=low, negative_prompt="blue square", num_inference_steps=2, generator=g,
                        **KW).images
        assert psnr([Image.open(f).convert("RGB")], want) >= 50


class _Counted(torch.nn.Module):
    """A stage's model that counts its calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kw):
        self.calls += 1
        return self.model(*args, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(noise_level=1000), "noise_level must be a whole number from 0 to 999"),
    (dict(steps=(2, 0)), "steps must be an int >= 1; got 0"),
    (dict(guidance_scale=(7.0, float("nan"))), "guidance_scale must be a finite number"),
])
def test_cascade_checks_stage_2_settings_before_stage_1_runs(parts, kw, match):
    """A stage II setting out of range was said only after stage I had run all its steps."""
    from imagine.pipelines.cascade import IFStage

    _, _, ours_1, ours_2 = parts
    counted = _Counted(ours_1.model)
    first = IFStage(counted, ours_1.scheduler_config, ours_1.sample_size, encoder=ours_1.encoder)
    run = {"steps": (2, 2), **kw}
    with pytest.raises(ValueError, match=match):
        IFCascade(first, ours_2)(PROMPTS, progress=False, **run)
    assert counted.calls == 0


def test_cli_noise_level_out_of_range_is_said_before_stage_1(folders, tmp_path, capsys, monkeypatch):
    from imagine.pipelines import cascade

    one, two = folders
    runs = []
    monkeypatch.setattr(cascade, "text_to_image", lambda *a, **k: runs.append(1))
    code, _, err = _run(capsys, "--model", one, "--stage-2", two, "a cat", "--noise-level", 1000,
                        "-o", tmp_path / "x.png", "-q")
    assert code != 0 and "--noise-level must be a whole number from 0 to 999 (a timestep of" in err
    assert not runs and not (tmp_path / "x.png").exists()
