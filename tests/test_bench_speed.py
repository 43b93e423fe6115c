"""`imagine bench speed`'s machinery on the small SD-shaped U-Net: in one process, and with each side in
a process of its own (--isolate). The truth: diffusers' fp32 step and ours on the same weights agree
to float32 rounding wherever they run (tests/test_sd_parity.py checks the same on tiny models)."""

import os

import pytest

pytest.importorskip("diffusers")

from imagine.bench.speed import bench_unet  # noqa: E402


@pytest.mark.parametrize("isolate", [False, True], ids=["one process", "isolated"])
def test_sides_run_alternately_and_agree_with_diffusers(isolate, one_thread):
    lines = []
    r = bench_unet("small", 1, ["diffusers_fp32", "imagine_exact"], log=lines.append, isolate=isolate)
    sides = r["sides"]
    assert set(sides) == {"diffusers_fp32", "imagine_exact"} and r["isolated"] is isolate
    assert r["latent"] == 32 and r["parameters"] > 1e6
    assert sides["diffusers_fp32"]["rel_err_vs_diffusers_fp32"] == 0
    assert 0 < sides["imagine_exact"]["rel_err_vs_diffusers_fp32"] < 1e-4
    for s in sides.values():
        assert len(s["seconds"]) == 1 and s["median_s"] > 0 and s["median_cpu_s"] > 0
    pids = {s["pid"] for s in sides.values()}
    if isolate:
        assert len(pids) == 2 and os.getpid() not in pids
    else:
        assert pids == {os.getpid()}
    assert any("round 1" in line for line in lines)


def test_a_side_process_that_dies_is_reported_not_waited_for(one_thread):
    """A side killed under the bench (the kernel's OOM killer sends SIGKILL) must end the bench with an error
    that says so, not leave it waiting for a reply that will never come."""
    import signal

    from imagine.bench.speed import _isolated_sides

    sides, stop, ask = _isolated_sides(("unet", "small", False), ["imagine_exact"], log=lambda *a: None)
    try:
        pid = sides["imagine_exact"](True)["pid"]  # one timed call: the side answers, from its own process
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"imagine_exact: its process died \(killed by signal 9, likely out of memory"):
            sides["imagine_exact"](True)
    finally:
        stop()


def test_a_calls_added_memory_is_what_it_takes(one_thread):
    """Peak +MB is the resident memory a call takes above the level after the heap's free memory is returned: a call
    that holds 100 MB of small blocks shows about 100 MB every time. (Measured against the heap as the calls before
    left it, the same call showed 0 MB once glibc kept their freed blocks: a small block above them holds the heap's
    top, so glibc's own trimming cannot return them.)"""
    import torch

    from imagine.bench.speed import _timed_call

    kept = []

    def side():
        blocks = [torch.ones(65536) for _ in range(400)]  # 400 x 256 KB
        kept.append(torch.ones(16))
        return torch.stack([b.sum() for b in blocks])

    added = [_timed_call(side)["peak_added_mb"] for _ in range(3)]
    assert all(90 < mb < 200 for mb in added), added


def test_the_serve_bench_percentiles_are_nearest_rank():
    from imagine.bench.serve import _percentiles

    p = _percentiles([float(x) for x in range(1, 11)])
    assert (p["p50"], p["p90"], p["max"]) == (5.0, 9.0, 10.0)  # the ceil(0.5 * 10)-th and ceil(0.9 * 10)-th
    assert _percentiles([float(x) for x in range(1, 101)])["p99"] == 99.0


def test_the_samplers_goal_compares_equal_model_calls():
    """A sampler that made more model calls than the budget (DPM adaptive's 57 at '10 steps') is not ours at 10."""
    from imagine.bench.samplers import goal

    res = {"floor": {"swd_std": 0.0001}, "results": {
        "ours: adaptive": {"10": {"swd": 0.002, "gap": 0.0, "nfe": 57}},
        "ours: dpmpp_2m": {"10": {"swd": 0.012, "gap": 0.0, "nfe": 10}},
        "diffusers: DPM++2M": {"20": {"swd": 0.010, "gap": 0.0, "nfe": 20}}}}
    g = goal(res)
    assert (g["ours"], g["ours_nfe"], g["theirs_nfe"], g["met"]) == ("ours: dpmpp_2m", 10, 20, False)
