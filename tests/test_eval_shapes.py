"""`imagine eval shapes`: an oracle that renders the true scene scores 1, blank images score 0,
seen and held-out are reported apart, and run() wires the pipeline, the grid and the JSON."""

import argparse
import json
import random
import sys
import types

import pytest
from PIL import Image

from imagine import evaluation as E
from imagine.data import shapes as S


def oracle(prompts, seeds):
    return [S.render(S.scene_for_caption(p, random.Random(s))) for p, s in zip(prompts, seeds)]


def blank(prompts, seeds):
    return [Image.new("RGB", (64, 64), "white") for _ in prompts]


@pytest.fixture(scope="module")
def prompts():
    return S.eval_prompts(n_per_family=12, seed=3)


def test_oracle_scores_one_and_writes_a_grid(prompts, tmp_path):
    grid = tmp_path / "grid.png"
    report = E.evaluate_shapes(oracle, prompts, batch_size=5, seed=10, grid_path=grid)
    assert report["overall"] == 1.0
    assert all(v["score"] == 1.0 for v in report["families"].values())
    assert set(report["families"]) == set(S.FAMILIES)
    assert report["seen"]["score"] == 1.0 and report["heldout"]["score"] == 1.0
    assert set(report["heldout"]["families"]) == {"pair", "relation"}
    assert report["counts"] == dict(n=len(prompts), correct=len(prompts))
    assert [r["seed"] for r in report["results"]] == list(range(10, 10 + len(prompts)))
    with Image.open(grid) as g:
        assert g.format == "PNG" and g.width > 6 * 128 and g.height > 7 * 128  # 7 rows of 6 examples
    table = E.format_report(report)
    for fam in S.FAMILIES:
        assert fam in table
    assert "overall" in table and "1.000" in table
    assert report["failures"] == {} and all(r["why"] is None for r in report["results"])


def test_blank_images_score_zero(prompts):
    report = E.evaluate_shapes(blank, prompts, batch_size=64)
    assert report["overall"] == 0.0 and report["counts"]["correct"] == 0
    assert all(v["score"] == 0.0 for v in report["families"].values())
    n = {f: sum(1 for p in prompts if p["family"] == f) for f in S.FAMILIES}
    assert report["failures"] == {f: {"absent": n[f]} for f in S.FAMILIES}
    assert "failures, relation: absent" in E.format_report(report)


def test_seen_and_heldout_reported_apart(prompts):
    def seen_only(ps, seeds):
        out = []
        for p, s in zip(ps, seeds):
            held = p in HELD
            out.append(blank([p], [s])[0] if held else oracle([p], [s])[0])
        return out

    HELD = {p["caption"] for p in prompts if p["heldout"]}
    report = E.evaluate_shapes(seen_only, prompts)
    assert report["seen"]["score"] == 1.0 and report["heldout"]["score"] == 0.0
    assert report["heldout_gap"] == 1.0
    assert report["families"]["pair"]["score"] == 0.5  # 12 seen + 12 held-out
    assert report["overall"] == pytest.approx((1 + 1 + 0.5 + 0.5 + 1) / 5)


def test_seeds_do_not_depend_on_batch_size(prompts):
    got = {}

    def record(ps, seeds):
        got.update(zip(seeds, ps))
        return blank(ps, seeds)

    E.evaluate_shapes(record, prompts[:9], batch_size=4, seed=5)
    first = dict(got)
    got.clear()
    E.evaluate_shapes(record, prompts[:9], batch_size=9, seed=5)
    assert got == first and sorted(got) == list(range(5, 14))


def test_bare_captions_and_errors():
    report = E.evaluate_shapes(oracle, ["a red circle", S.canonical_caption("pair", sorted(S.HELDOUT_COMBINATIONS)[0])])
    assert report["heldout"]["families"]["pair"]["n"] == 1 and report["overall"] == 1.0
    with pytest.raises(ValueError, match="returned 0 images"):
        E.evaluate_shapes(lambda p, s: [], ["a red circle"])
    with pytest.raises(ValueError, match="not a canonical"):
        E.evaluate_shapes(oracle, ["a red circle."])
    with pytest.raises(TypeError, match="PIL images"):
        E.evaluate_shapes(lambda p, s: [None] * len(p), ["a red circle"])


def test_run_wires_the_pipeline(tmp_path, monkeypatch, capsys):
    calls = []

    class FakePipeline:
        defaults = {"steps": 20, "sampler": "dpmpp_2m", "guidance_scale": 5.0}

        @classmethod
        def from_pretrained(cls, path, precision="exact"):
            calls.append(("load", path))
            return cls()

        def __call__(self, prompts, seeds, **options):
            calls.append(("call", len(prompts), options))
            return oracle(prompts, seeds)

    module = types.ModuleType("imagine.pipelines.text_to_image")
    module.TextToImagePipeline = FakePipeline
    monkeypatch.setitem(sys.modules, "imagine.pipelines.text_to_image", module)
    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    out, js = tmp_path / "out", tmp_path / "r.json"
    args = parser.parse_args(["--model", "m", "--n-per-family", "2", "--steps", "7", "--sampler", "ddim",
                              "--out", str(out), "--json", str(js), "--batch-size", "16"])
    assert E.run(args) == 0
    assert calls[0] == ("load", "m")
    # guidance scale not given: the pipeline's default; no progress bars inside an evaluation
    assert calls[1][2] == dict(steps=7, sampler="ddim", progress=False)
    report = json.loads(js.read_text())
    assert report["overall"] == 1.0 and report["counts"]["n"] == 2 * 3 + 4 * 2
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "grid.png").exists()
    assert "overall" in capsys.readouterr().out
    args = parser.parse_args(["--n-per-family", "0", "--out", str(out)])
    with pytest.raises(ValueError, match="n-per-family"):
        E.run(args)
    # a sweep: one evaluation per preset row, its options reaching the pipeline, one table
    calls.clear()
    args = parser.parse_args(["--model", "m", "--n-per-family", "1", "--sweep", "schedules", "--out", str(out / "sw"),
                              "--batch-size", "16"])
    assert E.run(args) == 0
    options = [c[2] for c in calls if c[0] == "call"]
    assert dict(sampler="unipc", steps=20, sigma_schedule="exponential", final_step="heun", progress=False) in options
    table = (out / "sw" / "sweep.md").read_text()
    assert "| unipc | 20 | 5.0 | - | exponential, heun |" in table and table.count("\n") == len(E.SWEEPS["schedules"]) + 2


def test_thresholding_sweep_rows_follow_the_models_range():
    rows = E.SWEEPS["thresholding"]
    # a model without a range of its own: its rows are the pixel rule's (R = 1), so they drop out as repeats
    plain = E._distinct(rows, {"guidance_scale": 3.0})
    assert [E._threshold_cell(r, {}) for r in plain] == ["-", "dynamic, R = 1", "static, R = 1"]
    ranged = E._distinct(rows, {"threshold_range": 4.84})
    cells = [E._threshold_cell(r, {"threshold_range": 4.84}) for r in ranged]
    assert cells == ["-", "dynamic, R = 1", "static, R = 1", "dynamic, R = 4.84", "static, R = 4.84"]
    table = E.format_sweep(ranged, [{"families": {}, "overall": 0.0, "seen": {"score": 0.0},
                                     "heldout": {"score": 0.0}}] * 5, {"threshold_range": 4.84})
    assert "| static, R = 4.84 |" in table


def test_seen_is_scored_over_the_families_held_out_prompts_have(prompts):
    """The seen score is pair and relation's, as the held-out one: a count family failing on seen prompts alone does
    not drag "seen" under "held-out" (it read 0.90 against 1.00 here)."""
    def all_but_count(ps, seeds):
        return [blank([p], [s])[0] if p in COUNT else oracle([p], [s])[0] for p, s in zip(ps, seeds)]

    COUNT = {p["caption"] for p in prompts if p["family"] == "count"}
    report = E.evaluate_shapes(all_but_count, prompts)
    assert report["seen"]["score"] == report["heldout"]["score"] == 1.0 and report["heldout_gap"] == 0.0
    assert report["seen"]["families"]["count"]["score"] == 0.0  # (listed still, per family)


def test_a_sweep_row_names_the_schedule_its_sampler_ran():
    """The model's default schedule and last step come with its default sampler alone (generate's rule): a row of
    another sampler ran without them and its cell says so."""
    defaults = {"sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 3.0, "sigma_schedule": "karras",
                "final_step": "heun"}
    empty = {"families": {}, "overall": 0.0, "seen": {"score": 0.0}, "heldout": {"score": 0.0}}
    table = E.format_sweep([{"sampler": "ddim"}, {"sampler": "DPM++ 2M"}], [empty, empty], defaults)
    rows = table.splitlines()[2:]
    assert "| ddim |" in rows[0] and "| -, euler |" in rows[0]
    assert "| karras, heun |" in rows[1]
