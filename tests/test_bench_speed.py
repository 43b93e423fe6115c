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
