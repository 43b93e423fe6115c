"""`imagine bench imagen` (imagine.bench.imagen) end to end at the test sizes, and its sides' guided step against
imagen-pytorch 2.1.0's Unet on the same weights. No timing is asserted."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import imagen_peer
from imagine.bench import imagen as bench
from imagine.cli import BENCHES
from imagine.hardware import native_bf16

RTOL = 1e-5  # max |ours - peer| / max |peer|, float32 (tests/test_efficient_unet_s31.py's)
BF16_BOUND = 0.15  # the same in bf16 (8 significant bits): a wrong weight or layout gives about 1


@pytest.fixture(scope="module")
def ip():
    return imagen_peer.load()  # (the offline import, before the bench's own loader looks for it)


def test_bench_runs_end_to_end_with_both_sides(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "imagen.json"
    assert BENCHES["imagen"][0] == "imagine.bench.imagen"
    # (in a process of its own: the bench collects garbage before each timed call, which takes seconds each in a test
    # worker's heap of thousands of tests)
    r = subprocess.run([sys.executable, "-m", "imagine.cli", "bench", "imagen", "--models", "tiny,tiny_sr", "--repeats",
                        "1", "--threads", "1", "--sides", ",".join(bench.SIDES), "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [m["model"] for m in result["models"]] == ["tiny", "tiny_sr"]
    assert result["imagen_pytorch"] == "2.1.0" and result["threads"] == 1
    for m in result["models"]:
        assert set(m["sides"]) == set(bench.SIDES)
        assert m["sides"]["imagen_pytorch"]["rel_diff_vs_imagen_pytorch"] == 0.0  # (the reference itself)
        for name, side in m["sides"].items():
            # (the fast side computes in bf16 where the CPU has it natively: 5.6e-2 measured on a Zen 4 for these tiny
            # random nets; float32 elsewhere)
            bound = BF16_BOUND if name == "imagine_fast" and native_bf16() else 1e-4
            assert side["rel_diff_vs_imagen_pytorch"] < bound, (name, side["rel_diff_vs_imagen_pytorch"])
            assert len(side["seconds"]) == 1 and side["median_s"] > 0 and side["median_cpu_s"] >= 0
            assert side["peak_added_mb"] >= 0 and "output" not in side
        assert {"imagine_vs_imagen_pytorch", "imagine_fast_vs_imagen_pytorch_batched"} <= set(m["ratios"]["cpu"])
    text = r.stdout
    assert "U-Net tiny_sr (8 -> 16 px" in text and "rel_diff_vs_imagen_pytorch" in text


@pytest.mark.parametrize("name", ["tiny", "tiny_sr"])
def test_the_sides_make_the_peers_guided_step(ip, name):
    """The bench's imagine sides (one call of batch 2, the second row's text dropped; plain, exact copy) against
    imagen-pytorch's forward_with_cond_scale calls (cond_drop_prob 0, then 1) on the same weights."""
    shape = bench.MODELS[name]
    peer, ours, _ = bench.build(shape)
    sides = bench._sides(shape, peer, ours, ["imagen_pytorch", "imagine", "imagine_exact"])
    with torch.no_grad():
        reference, plain, exact = (sides[n]() for n in ("imagen_pytorch", "imagine", "imagine_exact"))
    assert (reference[0] - reference[1]).abs().max() > 1e-3  # the null text changes the output
    assert plain.shape == reference.shape == (2, 3, shape.size, shape.size)
    assert bench._rel(plain, reference) < RTOL and bench._rel(exact, reference) < RTOL


@pytest.mark.parametrize("flags, message", [
    (["--models", "base32"], r"--models: unknown \['base32'\]; valid: tiny, tiny_sr, base64"),
    (["--models", " , "], "--models: name at least one of tiny"),
    (["--sides", "imagine,diffusers_fp32"], r"unknown \['diffusers_fp32'\]; valid: imagen_pytorch"),
    (["--repeats", "0"], "--repeats must be at least 1; got 0"),
    (["--threads", "0"], "--threads must be at least 1; got 0"),
])
def test_flag_refusals(flags, message):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    with pytest.raises(ValueError, match=message):
        bench.run(p.parse_args(flags))
