"""Score a text-to-image model on the shapes task with the exact judge (shared/specs/shapes.md).

A seeded set of canonical prompts (`imagine.data.shapes.eval_prompts`: every family, and for the
pair and relation families both seen and held-out object combinations) is generated with one
seed per prompt, and each image is judged by `imagine.data.judge`. The report gives the score per
family, the overall score (the mean of the family scores), the seen and held-out scores apart,
and a grid PNG of examples with their captions and verdicts.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from imagine.data.judge import FAILURES, detect_objects, diagnose, judge_objects, parse_caption, score
from imagine.data.shapes import FAMILIES, eval_prompts, is_heldout
from imagine.hardware import PRECISION_HELP

log = logging.getLogger(__name__)


def _normalise_prompts(prompts) -> list[dict]:
    """dicts (caption, family, heldout) pass through checked; bare captions get both from the parse."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            parsed = parse_caption(p)
            objs = [(o["color"], o["shape"]) for o in parsed["objects"]]
            held = parsed["family"] in ("pair", "relation") and is_heldout(*objs)
            out.append(dict(caption=p, family=parsed["family"], heldout=held))
        elif isinstance(p, dict) and "caption" in p:
            parsed = parse_caption(p["caption"])
            family = p.get("family", parsed["family"])
            if family != parsed["family"]:
                raise ValueError(f"prompt {p['caption']!r} is of family {parsed['family']!r}, not {family!r}")
            out.append(dict(caption=p["caption"], family=family, heldout=bool(p.get("heldout", False))))
        else:
            raise TypeError(f"a prompt must be a caption str or a dict with a 'caption'; got {type(p).__name__}")
    if not out:
        raise ValueError("no prompts to evaluate")
    return out


def evaluate_shapes(generate_fn, prompts=None, batch_size: int = 8, seed: int = 0, grid_path=None,
                    grid_columns: int = 6) -> dict:
    """Generate one image per prompt with `generate_fn(prompts, seeds) -> list[PIL.Image]` (prompt i
    gets seed `seed + i`, so a run is reproducible at any batch size), judge each, and return the
    report of `imagine.data.judge.score` plus `results` (caption, family, heldout, seed, ok and why
    per prompt: why is judge.diagnose's failure label, None for a pass), `failures` (the labels
    counted per family) and `seconds`. `prompts`: eval_prompts() items or bare canonical captions (None: the
    default eval_prompts()). With `grid_path`, a PNG of up to `grid_columns` examples per family
    (seen and held-out on separate rows) with captions and verdicts is written there."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    items = _normalise_prompts(eval_prompts() if prompts is None else prompts)
    results, examples = [], {}
    start = time.perf_counter()
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        seeds = [seed + b + k for k in range(len(batch))]
        images = list(generate_fn([p["caption"] for p in batch], seeds))
        if len(images) != len(batch):
            raise ValueError(f"generate_fn returned {len(images)} images for {len(batch)} prompts")
        for p, s, img in zip(batch, seeds, images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"generate_fn must return PIL images; got {type(img).__name__}")
            objects = detect_objects(img)
            ok = judge_objects(objects, p["caption"])
            results.append(dict(p, seed=s, ok=ok, why=None if ok else diagnose(objects, p["caption"])))
            group = examples.setdefault((p["family"], p["heldout"]), [])
            if len(group) < grid_columns:
                group.append((img.convert("RGB"), p["caption"], results[-1]["why"]))
        log.info("shapes eval: %d/%d images", min(b + batch_size, len(items)), len(items))
    report = score([(r["ok"], r["caption"], r["family"], r["heldout"]) for r in results])
    report["failures"] = failure_counts(results)
    report["results"] = results
    report["seconds"] = time.perf_counter() - start
    if grid_path is not None:
        report["grid"] = str(save_grid(examples, grid_path))
    return report


def failure_counts(results) -> dict:
    """{family: {failure label: count}} over the failed results (labels of judge.FAILURES, in that order)."""
    out: dict[str, dict[str, int]] = {}
    for r in results:
        if not r["ok"]:
            fam = out.setdefault(r["family"], {})
            fam[r["why"]] = fam.get(r["why"], 0) + 1
    return {f: dict(sorted(c.items(), key=lambda kv: FAILURES.index(kv[0]))) for f, c in out.items()}


# ----------------------------------------------------------------------------------- output

def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


def save_grid(examples: dict, path, scale: int = 2) -> Path:
    """One row per (family, seen/held-out) group: each image upscaled `scale`x (nearest), framed
    green if the judge passed it and red if not, its verdict (with the failure label of
    judge.diagnose) and caption below. `examples`: {(family, heldout): [(image, caption, why)]}, why
    None for a pass."""
    font = ImageFont.load_default()
    cell_w, pad, text_h = 64 * scale, 6, 48
    order = [k for f in FAMILIES for k in ((f, False), (f, True)) if k in examples]
    columns = max((len(v) for v in examples.values()), default=1)
    header = 14
    row_h = header + cell_w + text_h + pad
    sheet = Image.new("RGB", (pad + columns * (cell_w + pad), max(1, len(order)) * row_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, key in enumerate(order):
        y0 = pad + r * row_h
        draw.text((pad, y0), f"{key[0]} ({'held-out' if key[1] else 'seen'} combinations)" if key[0] in
                  ("pair", "relation") else key[0], fill="black", font=font)
        for c, (img, caption, why) in enumerate(examples[key]):
            ok = why is None
            x0, yi = pad + c * (cell_w + pad), y0 + header
            colour = (30, 150, 60) if ok else (200, 30, 30)
            sheet.paste(img.resize((cell_w, cell_w), Image.NEAREST), (x0, yi))
            draw.rectangle((x0 - 2, yi - 2, x0 + cell_w + 1, yi + cell_w + 1), outline=colour, width=2)
            lines = ["PASS" if ok else f"FAIL: {why}"] + _wrap(draw, caption, font, cell_w)
            for k, line in enumerate(lines[:4]):
                draw.text((x0, yi + cell_w + 3 + 11 * k), line, fill=colour if k == 0 else "black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sheet.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _fmt(x) -> str:
    return "  -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def format_report(report: dict) -> str:
    """A plain-text table: per family the score on all prompts, on seen and on held-out ones."""
    seen, held = report["seen"]["families"], report["heldout"]["families"]
    lines = [f"{'family':<10} {'score':>6} {'correct':>9} {'seen':>6} {'held-out':>9}"]
    for f, v in report["families"].items():
        s = seen.get(f, {}).get("score")
        h = held.get(f, {}).get("score")
        lines.append(f"{f:<10} {_fmt(v['score']):>6} {str(v['correct']) + '/' + str(v['n']):>9} "
                     f"{_fmt(s):>6} {_fmt(h):>9}")
    c = report["counts"]
    lines.append(f"{'overall':<10} {_fmt(report['overall']):>6} {str(c['correct']) + '/' + str(c['n']):>9} "
                 f"{_fmt(report['seen']['score']):>6} {_fmt(report['heldout']['score']):>9}")
    lines.append("overall = mean of the family scores; seen/held-out = mean over the families that have held-out "
                 f"prompts (pair, relation); held-out gap (seen - held-out) = {_fmt(report.get('heldout_gap'))}")
    for f, counts in report.get("failures", {}).items():
        lines.append(f"failures, {f}: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return "\n".join(lines)


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ----------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    parser.add_argument("--n-per-family", type=int, default=100,
                        help="prompts per family (pair and relation get this many seen plus as many held-out)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    parser.add_argument("--sampler", default=None, help="sampler name (default: the pipeline's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed SEED + i")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt set")
    parser.add_argument("--out", default="shapes-eval", help="folder for grid.png and report.json")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--thresholding", choices=["static", "dynamic"], default=None,
                        help="clip x0 predictions while sampling (Imagen's dynamic thresholding or static)")
    parser.add_argument("--threshold-range", type=float, default=None,
                        help="R, the data's range that thresholding holds x0 to (default: the model's, else 1 = pixels)")
    parser.add_argument("--schedule-type", dest="sigma_schedule",
                        choices=["karras", "exponential", "polyexponential", "beta", "align_your_steps",
                                 "align_your_steps_sdxl"],  # (schedules.SIGMA_SCHEDULES)
                        default=None, help="noise levels' spacing (default: the model's)")
    parser.add_argument("--final-step", choices=["euler", "heun"], default=None,
                        help="the last step to sigma = 0 (default: the model's)")
    parser.add_argument("--precision", choices=["exact", "fast"], default="exact", help=PRECISION_HELP)
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                        help="run a preset sweep of settings (the papers' claims) and print one table")


# Preset sweeps: the papers' claims, reproduced on the shapes task (settings per row).
SWEEPS = {
    # Ho & Salimans 2022 / GLIDE: guidance trades diversity for fidelity; 1 = no guidance.
    "guidance": [dict(guidance_scale=g) for g in (1.0, 3.0, 5.0, 7.5)],
    # DDPM needs many steps; DDIM (Song et al. 2021) and DPM-Solver++ (Lu et al. 2022) need few.
    "samplers": ([dict(sampler="ddpm", steps=n) for n in (10, 50, 1000)]
                 + [dict(sampler="ddim", steps=n) for n in (10, 20, 50)]
                 + [dict(sampler="dpmpp_2m", steps=n) for n in (10, 20)]),
    # the few-step samplers of docs/samplers.md on the trained model (the choice of the model's defaults)
    "schedules": [dict(sampler="dpmpp_2m", steps=20), dict(sampler="dpmpp_2m", steps=20, sigma_schedule="karras"),
                  dict(sampler="unipc", steps=20, sigma_schedule="exponential"),
                  dict(sampler="unipc", steps=20, sigma_schedule="exponential", final_step="heun"),
                  dict(sampler="dpmpp_2m_sde", steps=20, sigma_schedule="exponential", final_step="heun"),
                  dict(sampler="unipc", steps=10, sigma_schedule="exponential", final_step="heun")],
    # Saharia et al. 2022: dynamic thresholding keeps high guidance scales from saturating. Imagen's rules
    # hold x_0 to the pixel range (R = 1); a latent model's own range (its "threshold_range") is the fair
    # transfer, so both are rows (the model's rows drop out when it has no range of its own).
    "thresholding": [dict(guidance_scale=12.0),
                     dict(guidance_scale=12.0, thresholding="dynamic", threshold_range=1.0),
                     dict(guidance_scale=12.0, thresholding="static", threshold_range=1.0),
                     dict(guidance_scale=12.0, thresholding="dynamic"),
                     dict(guidance_scale=12.0, thresholding="static")],
    # Chung et al. 2024 (CFG++): renoising along the unconditional prediction keeps guided samples on the data
    # manifold; CFG scales 3 / 7.5 / 12 against CFG++'s lambda = scale / 12.5 (A1111's mapping), DDIM both
    "cfgpp": ([dict(sampler="ddim", steps=20, guidance_scale=g) for g in (3.0, 7.5, 12.0)]
              + [dict(sampler="ddim_cfgpp", steps=20, guidance_scale=g / 12.5) for g in (3.0, 7.5, 12.0)]),
}


def run(args) -> int:
    if args.n_per_family < 1:
        raise ValueError(f"--n-per-family must be at least 1; got {args.n_per_family}")
    from imagine.pipelines.text_to_image import TextToImagePipeline

    if _is_imagen_folder(args.model):
        pipe = ImagenShapes(args)
    else:
        pipe = TextToImagePipeline.from_pretrained(args.model, precision=args.precision)  # None: the default model
    base = {k: v for k, v in dict(steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler,
                                  thresholding=args.thresholding, threshold_range=getattr(args, "threshold_range", None),
                                  sigma_schedule=getattr(args, "sigma_schedule", None),
                                  final_step=getattr(args, "final_step", None)).items() if v is not None}
    rows = [dict(base)] if args.sweep is None else _distinct(
        [{**base, **row} for row in SWEEPS[args.sweep]], pipe.defaults)
    out = Path(args.out)
    reports = []
    for k, options in enumerate(rows):
        sub = out if len(rows) == 1 else out / "-".join(f"{a}{b}" for a, b in options.items())
        reports.append(_evaluate_one(pipe, args, options, sub))
    if len(rows) > 1:
        table = format_sweep(rows, reports, pipe.defaults)
        print(table)
        (out / "sweep.md").write_text(table + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(_json_safe(reports), indent=1))
    return 0


def _is_imagen_folder(model) -> bool:
    index = Path(model) / "model_index.json" if model else None
    if index is None or not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == "ImagenPipeline"
    except ValueError:
        return False


class ImagenShapes:
    """An Imagen cascade folder (imagine train imagen's model/) as the shapes eval calls a pipeline: pipe(prompts,
    seeds=, steps=, guidance_scale=, sampler=) -> PIL pictures on the task's 64x64 canvas (a cascade ending below
    64 px is judged on its pictures resized up, bicubic). Its stages sample on their log-SNR grids (DDPM by default,
    imagine.pipelines.imagen.SAMPLERS), or an ElucidatedImagen's over EDM's levels (Heun with churn by default,
    imagine.pipelines.elucidated_imagen.SAMPLERS), so the steps, the sampler and the guidance scale (its cond_scale,
    every stage) vary."""

    OPTIONS = ("steps", "guidance_scale", "sampler")
    CANVAS = 64  # shared/specs/shapes.md

    def __init__(self, args):
        from imagine.pipelines.imagen import ImagenPipeline

        given = [flag for flag, value in (("--thresholding", args.thresholding),
                                          ("--threshold-range", args.threshold_range),
                                          ("--schedule-type", args.sigma_schedule), ("--final-step", args.final_step))
                 if value is not None] + (["--precision fast"] if args.precision != "exact" else [])
        if args.sweep not in (None, "guidance", "samplers"):
            given.append(f"--sweep {args.sweep}")
        if given:
            raise ValueError(f"{', '.join(given)}: not for an Imagen cascade, which samples on its stages' log-SNR "
                             "grids with its folder's thresholding; it takes --steps, --sampler, --guidance-scale "
                             "and --sweep guidance or samplers")
        self.pipe = ImagenPipeline.from_pretrained(args.model)
        edm = self.pipe.imagen_type == "elucidated"
        if edm and args.sweep == "samplers":
            raise ValueError("--sweep samplers runs DDPM / DDIM / DPM++ 2M on Imagen's log-SNR grids; this is an "
                             "ElucidatedImagen cascade (EDM levels): give --sampler and --steps instead")
        # (as the sweep table names them: DDPM over each stage's log-SNR grid, its last step the posterior's mean; an
        # ElucidatedImagen's Heun over EDM's levels, its last step Euler's)
        self.defaults = {"steps": self.pipe.defaults.get("steps"), "sampler": self.pipe.default_sampler,
                         "sigma_schedule": "EDM (Karras)" if edm else "log-SNR", "final_step": "euler" if edm else "mean",
                         "guidance_scale": self.pipe.defaults.get("guidance_scale", 1.0)}

    def __call__(self, prompts, seeds, progress=False, **options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not for an Imagen cascade (it takes {', '.join(self.OPTIONS)})")
        steps = options.get("steps", self.defaults["steps"])
        scale = options.get("guidance_scale", self.defaults["guidance_scale"])
        pictures = self.pipe.sample(list(prompts), seeds=list(seeds), steps=steps, cond_scale=scale,
                                    output_type="pil", progress=progress,
                                    sampler=options.get("sampler", self.defaults["sampler"]))
        return [p if p.width == self.CANVAS else p.resize((self.CANVAS, self.CANVAS), Image.BICUBIC)
                for p in pictures]


def _threshold_cell(opt: dict, defaults: dict) -> str:
    if not opt.get("thresholding"):
        return "-"
    return f"{opt['thresholding']}, R = {float(opt.get('threshold_range') or defaults.get('threshold_range', 1.0)):g}"


def _distinct(rows: list[dict], defaults: dict) -> list[dict]:
    """The rows whose settings, with the model's defaults filled in, differ from every earlier row's."""
    seen, out = set(), []
    for row in rows:
        key = (tuple(sorted((k, str(v)) for k, v in row.items() if k not in ("thresholding", "threshold_range"))),
               _threshold_cell(row, defaults))
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _guidance_used(opt: dict, defaults: dict):
    # the scale the row ran with: the one given, else the model's default (for a CFG++ sampler its lambda, the
    # default CFG scale / 12.5, as the pipeline takes it)
    from imagine.samplers import default_guidance_scale

    if opt.get("guidance_scale") is not None:
        return opt["guidance_scale"]
    if defaults.get("guidance_scale") is None:
        return None
    return default_guidance_scale(defaults["guidance_scale"], opt.get("sampler") or defaults.get("sampler"))


def format_sweep(rows: list[dict], reports: list[dict], defaults: dict) -> str:
    """A markdown table: one row per setting, the judge's scores per family and overall."""
    head = ("| sampler | steps | guidance | thresholding | schedule, last step | " + " | ".join(FAMILIES)
            + " | overall | seen | held-out |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    from imagine.samplers import same_sampler

    for opt, rep in zip(rows, reports):
        fam = rep["families"]
        sampler = opt.get("sampler", defaults.get("sampler"))
        # (the model's default schedule and last step come with its default sampler alone, as generate gives them)
        own = same_sampler(str(sampler), str(defaults.get("sampler")))
        schedule = opt.get("sigma_schedule") or (defaults.get("sigma_schedule") if own and not opt.get("karras")
                                                 else None)
        cells = [str(sampler), str(opt.get("steps", defaults.get("steps"))),
                 str(_guidance_used(opt, defaults)), _threshold_cell(opt, defaults),
                 f"{schedule or '-'}, {opt.get('final_step') or (defaults.get('final_step') if own else None) or 'euler'}"]
        cells += [f"{fam[f]['score']:.3f}" if f in fam else "-" for f in FAMILIES]
        cells += [f"{rep['overall']:.3f}", f"{rep['seen']['score']:.3f}", f"{rep['heldout']['score']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _evaluate_one(pipe, args, options: dict, out: Path) -> dict:
    def generate(prompts, seeds):
        return pipe(prompts, seeds=seeds, progress=False, **options)

    prompts = eval_prompts(args.n_per_family, seed=args.prompt_seed)
    report = evaluate_shapes(generate, prompts, batch_size=args.batch_size, seed=args.seed,
                             grid_path=out / "grid.png")
    report["settings"] = dict(model=args.model or "default", n_per_family=args.n_per_family, seed=args.seed,
                              prompt_seed=args.prompt_seed, precision=args.precision, **options)
    print(format_report(report))
    text = json.dumps(_json_safe(report), indent=1)
    single = args.sweep is None
    for target in [out / "report.json"] + ([Path(args.json)] if args.json and single else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    print(f"grid: {report['grid']}; report: {out / 'report.json'}")
    return report
