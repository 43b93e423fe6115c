"""AUTOMATIC1111's prompt editing (imagine.prompt_editing): `[from:to:when]`, `[to:when]`, `[from::when]`, `[a|b]`.

The truths: the schedules of A1111's documented examples, counted by hand from its rules (a `when` with a '.' is a
fraction of the steps; step i, from 0, reads the first text whose last step is >= i); and the image: diffusers'
StableDiffusionPipeline changing its prompt_embeds at the same steps through its `callback_on_step_end` gives ours
(50 dB, the SD parity bar). A prompt without the syntax encodes as without it; a row's image does not depend on
its batch; the A1111 API and the CLI read it."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from test_loading import save_diffusers_folder  # noqa: E402
from test_sd_parity import CFG, SEED, psnr  # noqa: E402

from imagine.prompt_editing import prompt_schedule, text_at
from imagine.samplers import a1111_settings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("prompt,steps,want", [
    # A1111's wiki: "a [fantasy:cyberpunk:16] landscape", fantasy for the first 16 steps
    ("a [fantasy:cyberpunk:16] landscape", 100, [(16, "a fantasy landscape"), (100, "a cyberpunk landscape")]),
    ("a [fantasy:cyberpunk:0.25] landscape", 20, [(5, "a fantasy landscape"), (20, "a cyberpunk landscape")]),
    ("a [mountain:5] lake", 10, [(5, "a  lake"), (10, "a mountain lake")]),  # [to:when]: added
    ("a [mountain::5] lake", 10, [(5, "a mountain lake"), (10, "a  lake")]),  # [from::when]: removed
    ("[cow|horse] in a field", 4, [(1, "cow in a field"), (2, "horse in a field"), (3, "cow in a field"),
                                   (4, "horse in a field")]),
    ("a [fantasy:[cyber:steam:8]punk:4] city", 10, [(4, "a fantasy city"), (8, "a cyberpunk city"),
                                                    (10, "a steampunk city")]),  # nested
    ("(a [red:blue:0.5] ball:1.2) [[dim]]", 10, [(5, "(a red ball:1.2) [[dim]]"), (10, "(a blue ball:1.2) [[dim]]")]),
    ("x [a:b:25] y", 20, [(20, "x a y")]),  # past the steps: capped, so the first text throughout
    ("x [a:b:1.0]", 10, [(10, "x a")]),  # with a '.' a fraction, even 1.0 (A1111 since 1.7; before, a step)
    ("x [a:b:1]", 10, [(1, "x a"), (10, "x b")]),
    ("[a:b]", 4, [(4, "[a:b]")]),  # no number: text (emphasis reads it later)
    ("(unclosed [a:b:2] end", 4, [(2, "(unclosed a end"), (4, "(unclosed b end")]),
    ("plain words, (emphasis:1.2)", 8, [(8, "plain words, (emphasis:1.2)")]),
    # what A1111's grammar cannot parse leaves the whole prompt as written: a '|' outside [a|b], a lone final backslash
    ("masterpiece | best, a [cat:dog:0.5]", 10, [(10, "masterpiece | best, a [cat:dog:0.5]")]),
    ("(red|blue) [cat:dog:2]", 10, [(10, "(red|blue) [cat:dog:2]")]),
    ("a [cat:dog:2] \\", 10, [(10, "a [cat:dog:2] \\")]),
    ("a [cat:dog:1e1]", 10, [(10, "a cat")]),  # (an exponent is a number, and without a '.' a step: 10)
])
def test_schedules_follow_a1111s_rules(prompt, steps, want):
    assert prompt_schedule(prompt, steps) == want


def test_step_i_reads_the_first_text_whose_last_step_is_at_least_i():
    """A1111's counting (its denoiser's step from 0): [a:b:3] reads a at steps 0-3, and [a|b] a, a, b, a."""
    s = prompt_schedule("[a:b:3]", 6)
    assert [s[text_at(s, i)][1] for i in range(6)] == ["a", "a", "a", "a", "b", "b"]
    s = prompt_schedule("[a|b]", 4)
    assert [s[text_at(s, i)][1] for i in range(4)] == ["a", "a", "b", "a"]


@pytest.mark.parametrize("sampler", ["heun", "dpm2", "dpm2_a", "dpmpp_2s_a"])
def test_second_order_samplers_count_model_calls_over_twice_the_steps_as_a1111(sampler):
    """A1111 schedules a second-order sampler's edits over 2N (its total_steps) and counts model calls: with the
    2N - 1 calls of Heun, DPM2, DPM2 a and DPM++ 2S a the denoiser asks for the text of call k; the pipeline's
    schedule spans 2N."""
    from imagine.guidance import StepConditioning
    from imagine.sampling import sample
    from imagine.schedules import NoiseSchedule

    asked = []
    cond = StepConditioning(lambda k: (asked.append(k), {})[1])
    sample(lambda x, t: torch.zeros_like(x), (1, 1, 2, 2), schedule=NoiseSchedule.from_config("scaled_linear"),
           prediction_type="epsilon", sampler=sampler, steps=5, cond=cond, seeds=0, progress=False)
    assert asked[1:] == list(range(9))  # (the first: check_cond's look at step 0)
    s = prompt_schedule("a [cat:dog:4] b", 2 * 10)  # 10 Heun steps: 'dog' from call 5, as A1111
    assert [s[text_at(s, k)][1] for k in range(19)].index("a dog b") == 5


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from imagine.pipelines.text_to_image import TextToImagePipeline

    folder = tmp_path_factory.mktemp("sd") / "folder"
    ref = save_diffusers_folder(folder, "sd1", scheduler="ddim")
    return ref, TextToImagePipeline.from_pretrained(folder)


def _diffusers_edited(ref, prompt: str, negative: str, steps: int) -> torch.Tensor:
    """diffusers' image with its prompt_embeds changed at each step to the text our schedule gives (A1111's)."""
    pos, neg = prompt_schedule(prompt, steps), prompt_schedule(negative, steps)

    def embeds(i):
        with torch.no_grad():
            return torch.cat([ref.encode_prompt(neg[text_at(neg, i)][1], "cpu", 1, False)[0],
                              ref.encode_prompt(pos[text_at(pos, i)][1], "cpu", 1, False)[0]])

    def switch(pipe, i, t, kwargs):
        return {"prompt_embeds": embeds(i + 1)}  # (after step i: the text of step i + 1)

    first = embeds(0)
    with torch.no_grad():
        return ref(prompt_embeds=first[1:], negative_prompt_embeds=first[:1], num_inference_steps=steps,
                   guidance_scale=CFG, height=32, width=32, generator=torch.Generator().manual_seed(SEED),
                   callback_on_step_end=switch, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                   output_type="pt").images[0].float()


@pytest.mark.parametrize("prompt,negative", [("a [red:blue:0.5] circle", "the square"),
                                             ("a [red|blue] circle", "[the square:a line:3]")])
def test_the_image_is_diffusers_changing_its_embeddings_at_those_steps(sd, prompt, negative):
    """On these tiny random weights a word changed for the last steps moves the image little (the run with the
    first texts throughout is 61-78 dB from diffusers' edited one), so the bar here is 100 dB (measured: 127)."""
    ref, pipe = sd
    want = _diffusers_edited(ref, prompt, negative, 10)

    def ours(p, n, **kw):
        res = pipe.generate(p, n, steps=10, guidance_scale=CFG, sampler="ddim", seed=SEED, height=32, width=32,
                            progress=False, output_type="latent", **kw)
        return ((pipe.decode(res.latents)[0] + 1) / 2).clamp(0, 1), res.parameters

    got, params = ours(prompt, negative, prompt_editing=True)
    assert psnr(got, want) >= 100 and params["prompt_editing"] is True
    first_texts = ours(prompt_schedule(prompt, 10)[0][1], prompt_schedule(negative, 10)[0][1])[0]
    assert psnr(first_texts, want) < 90  # the edits matter at this bar
    assert psnr(ours(prompt, negative)[0], want) < 90  # without the flag the brackets are text


def test_the_pipeline_schedules_heun_over_twice_its_steps(sd, monkeypatch):
    _, pipe = sd
    spans = []
    encode = pipe._encode_texts
    monkeypatch.setattr(pipe, "_encode_texts", lambda texts, e, lp, line: (spans.append(line.steps),
                                                                            encode(texts, e, lp, line))[1])
    for sampler in ("heun", "euler", "DPM2 a", "dpmpp_2s_a", "lms"):
        pipe.generate("a [red:blue:2] circle", prompt_editing=True, sampler=sampler, steps=3, height=16, width=16,
                      progress=False, output_type="latent")
    assert spans == [6, 6, 3, 3, 6, 6, 6, 6, 3, 3]  # (prompt and negative prompt each)


def test_no_syntax_is_the_plain_run_and_a_row_does_not_depend_on_its_batch(sd):
    _, pipe = sd
    kw = dict(steps=4, guidance_scale=CFG, height=16, width=16, progress=False, output_type="latent")
    plain = pipe.generate("a red circle", seed=3, **kw).latents
    assert torch.equal(pipe.generate("a red circle", seed=3, prompt_editing=True, **kw).latents, plain)
    both = pipe.generate(["a [red:blue:2] circle", "a red circle"], ["[x|y]", None], seeds=[4, 3],
                         prompt_editing=True, **kw).latents
    assert torch.allclose(both[1:], plain, atol=1e-5, rtol=0)
    alone = pipe.generate("a [red:blue:2] circle", "[x|y]", seed=4, prompt_editing=True, **kw).latents
    assert torch.allclose(both[:1], alone, atol=1e-5, rtol=0)


def api_and_cli_images(pipe, prompt: str, cli_flags: list[str], tmp_path, capsys) -> tuple[bytes, bytes]:
    """The RGB bytes of the A1111 API's txt2img image and of the CLI's PNG for `prompt` (4 Euler steps at CFG, 16 x 16,
    seed 6), the CLI run with `cli_flags` and --a1111-sampling (the API runs its samplers as A1111 does)."""
    httpx = pytest.importorskip("httpx")
    from imagine.cli import main
    from imagine.server.app import BackgroundServer, ServerConfig, create_app

    with BackgroundServer(create_app(pipe, ServerConfig(max_width=64, max_height=64))) as srv:
        body = {"prompt": prompt, "steps": 4, "cfg_scale": CFG, "width": 16, "height": 16, "seed": 6,
                "sampler_name": "Euler"}
        r = httpx.post(f"{srv.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code == 200, r.text
        api = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB").tobytes()
    out = tmp_path / "x.png"
    code = main(["generate", "--model", pipe.c.source, prompt, *cli_flags, "--steps", "4", "--guidance-scale", str(CFG),
                 "--height", "16", "--width", "16", "--sampler", "euler", "--a1111-sampling", "--seed", "6", "-o",
                 str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    return api, Image.open(out).convert("RGB").tobytes()


def test_the_a1111_api_and_the_cli_read_prompt_editing(sd, tmp_path, capsys):
    _, pipe = sd
    prompt = "a [red:blue:0.5] (circle:1.1)"
    # (Euler as AUTOMATIC1111 runs it, as its API does: samplers.a1111_settings, --a1111-sampling)
    kw = dict(steps=4, guidance_scale=CFG, height=16, width=16, seed=6, progress=False, **a1111_settings("Euler"))
    want = pipe.generate(prompt, prompt_editing=True, emphasis=True, **kw).images[0].convert("RGB").tobytes()
    assert api_and_cli_images(pipe, prompt, ["--prompt-editing", "--emphasis"], tmp_path, capsys) == (want, want)


@pytest.mark.parametrize("prompt,steps,first_pass,old,want", [
    # A1111's docstring (get_learned_conditioning_prompt_schedules([p], 10, 10)): a hires. fix second pass reads
    # `when` on one timeline over both passes, a fraction from 1 to 2 spanning the second
    ("a [b:.5] c", 10, 10, False, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, False, [(5, "a  c"), (10, "a b c")]),
    ("x [a:b:25]", 10, 20, False, [(5, "x a"), (10, "x b")]),  # a step number counts from the first pass's start
    ("x [a:b:15]", 10, 20, False, [(10, "x b")]),  # (a step of the first pass: done before this one starts)
    ("x [a|b]", 3, 20, False, [(1, "x a"), (2, "x b"), (3, "x a")]),  # alternation over this pass's steps
    # A1111's old timelines (use_old_scheduling): under 1 a fraction, else a step, with or without a '.'
    ("x [a:b:1.0]", 10, None, True, [(1, "x a"), (10, "x b")]),
    ("x [a:b:2.5]", 10, None, True, [(2, "x a"), (10, "x b")]),
    ("x [a:b:0.25]", 20, None, True, [(5, "x a"), (20, "x b")]),
    ("x [a:b:0.5]", 10, 20, True, [(10, "x a"), (20, "x b")]),  # a second pass read over the first pass's steps
])
def test_hires_and_old_timelines_follow_a1111s_rules(prompt, steps, first_pass, old, want):
    assert prompt_schedule(prompt, steps, first_pass, old) == want


def test_past_the_schedules_end_the_first_text_is_read():
    """An old-timeline hires pass longer than the first pass runs past its schedule's end (it spans the first pass's
    steps): A1111's reconstruct_cond_batch then reads the first text."""
    s = prompt_schedule("a [red:blue:2] circle", 8, first_pass=4, old=True)
    assert s == [(2, "a red circle"), (4, "a blue circle")]
    assert [s[text_at(s, i)][1].split()[1] for i in range(8)] == ["red"] * 3 + ["blue"] * 2 + ["red"] * 3


def test_a_hires_second_pass_continues_the_first_passes_timeline(sd, monkeypatch):
    """`[red:blue:0.5]` has read blue since the first pass's middle: the second pass reads blue throughout, as the
    same run with the second pass's prompt "a blue circle" does (A1111 1.6+); a second pass on a timeline of its own
    (imagine before, starting on red again) differs, as the old timelines do."""
    import imagine.pipelines.text_to_image as t2i

    _, pipe = sd
    kw = dict(steps=4, guidance_scale=CFG, sampler="euler", seed=SEED, height=32, width=32, progress=False,
              hires_scale=1.5, hires_strength=0.6, prompt_editing=True, output_type="latent")
    edited = pipe.generate_hires("a [red:blue:0.5] circle", **kw)
    blue = pipe.generate_hires("a [red:blue:0.5] circle", hires_prompt="a blue circle", **kw)
    assert torch.equal(edited.latents, blue.latents)
    old = pipe.generate_hires("a [red:blue:0.5] circle", old_prompt_editing=True, **kw)
    assert not torch.equal(old.latents, edited.latents) and old.parameters["old_prompt_editing"] is True
    monkeypatch.setattr(t2i, "prompt_schedule", lambda text, steps, first_pass, old: prompt_schedule(text, steps,
                                                                                                    None, old))
    alone = pipe.generate_hires("a [red:blue:0.5] circle", **kw)
    assert not torch.equal(alone.latents, edited.latents)  # (so the bar above can fail)
