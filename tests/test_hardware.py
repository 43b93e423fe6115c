"""The machine-dependent choices: bf16 only where the CPU has it natively."""

from __future__ import annotations

import pytest
import torch

from imagine.hardware import native_bf16, resolve_mixed_precision
from imagine.pipelines.text_to_image import TextToImagePipeline, decode_latents, exact_copy, fast_copy
from imagine.testing import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("flags, onednn, want", [
    ({"avx2", "fma"}, False, False),  # an AVX2-only part (oneDNN agrees)
    ({"avx512f", "avx512bw", "avx512vl", "avx512dq"}, True, False),  # Skylake-SP / Cascade Lake / Ice Lake:
    # oneDNN says "bf16 supported" (it can emulate it), but bf16 dot products are emulated and slower than fp32
    ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}, True, True),  # Zen 4, Cooper Lake
    ({"avx512f", "avx512bw", "amx_bf16", "amx_tile"}, True, True),  # AMX (Sapphire Rapids)
    ({"amx_bf16"}, False, True),  # the flags decide, not oneDNN
    (set(), True, True),  # no /proc/cpuinfo flags (macOS, ARM): oneDNN's answer
    (set(), False, False),
], ids=["avx2", "avx512-without-bf16", "avx512_bf16", "amx", "flags-over-oneDNN", "unreadable-yes", "unreadable-no"])
def test_detection_needs_bf16_dot_products_in_the_cpu_flags(monkeypatch, flags, onednn, want):
    """native_bf16(): AVX512-BF16 or AMX in /proc/cpuinfo's flags; oneDNN's check only where the flags cannot be
    read (oneDNN's "bf16 supported" is true on any AVX512BW/VL/DQ CPU, where bf16 is emulated)."""
    from imagine import hardware

    monkeypatch.delenv(hardware.BF16_ENV, raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    hardware.native_bf16.cache_clear()
    try:
        assert native_bf16() is want
        assert hardware.fast_dtype() == (torch.bfloat16 if want else torch.float32)
    finally:
        monkeypatch.undo()
        hardware.native_bf16.cache_clear()


def test_detection_override(monkeypatch):
    from imagine import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    for value, want in (("0", False), ("1", True)):
        monkeypatch.setenv(hardware.BF16_ENV, value)
        hardware.native_bf16.cache_clear()
        assert native_bf16() is want
    monkeypatch.undo()
    hardware.native_bf16.cache_clear()


def test_detection_on_this_machine(monkeypatch):
    from imagine import hardware

    monkeypatch.delenv(hardware.BF16_ENV, raising=False)
    hardware.native_bf16.cache_clear()
    try:
        flags = hardware.cpu_flags()
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        want = bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else onednn
        assert native_bf16() is want
    finally:
        monkeypatch.undo()
        hardware.native_bf16.cache_clear()


@pytest.mark.usefixtures("no_bf16_mode")
def test_mixed_precision_auto_without_native_bf16():
    assert resolve_mixed_precision("auto") == ("bf16" if torch.cuda.is_available() else "no")
    assert resolve_mixed_precision(False) == "no"  # YAML's bare `no`
    assert resolve_mixed_precision("bf16") == "bf16"  # asked for explicitly: kept
    with pytest.raises(ValueError, match="'auto', 'no', 'bf16' or 'fp16'"):
        resolve_mixed_precision("fp8")


@pytest.mark.usefixtures("bf16_mode")
def test_mixed_precision_auto_with_native_bf16():
    assert resolve_mixed_precision("auto") == "bf16"


def _pipe(tmp_path, precision):
    folder = make_tiny_model(tmp_path / "m", seed=3) if not (tmp_path / "m").exists() else tmp_path / "m"
    return TextToImagePipeline.from_pretrained(folder, precision=precision)


@pytest.mark.usefixtures("no_bf16_mode")
def test_fast_mode_without_native_bf16_is_float32_and_equals_exact(tmp_path, caplog):
    exact = _pipe(tmp_path, "exact")
    with caplog.at_level("WARNING"):
        fast = _pipe(tmp_path, "fast")
    assert "no native bfloat16" in caplog.text
    # no Winograd layer in the tiny model: the fast mode runs the exact mode's float32 copy
    assert fast_copy(fast.unet) is exact_copy(fast.unet) and fast_copy(fast.vae) is exact_copy(fast.vae)
    kw = dict(steps=3, seed=1, guidance_scale=2.0)
    ia, ib = exact.generate("a red circle", **kw), fast.generate("a red circle", **kw)
    assert torch.equal(ia.latents, ib.latents)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(decode_latents(exact.vae, z, "exact"), decode_latents(fast.vae, z, "fast"))


@pytest.mark.usefixtures("bf16_mode")
def test_fast_mode_with_native_bf16_runs_a_bf16_copy(tmp_path):
    fast = _pipe(tmp_path, "fast")
    copy = fast_copy(fast.unet)
    assert copy is not fast.unet and next(copy.parameters()).dtype == torch.bfloat16
    assert next(fast.unet.parameters()).dtype == torch.float32  # the original is left alone


def test_speed_bench_compares_with_diffusers_fastest_timed_setting():
    from imagine.bench.speed import _ratios

    side = lambda s: {"median_s": s}  # noqa: E731
    r = _ratios({"diffusers_fp32": side(10.0), "imagine_exact": side(9.0), "imagine_fast": side(8.0)})
    assert r["diffusers_fastest"] == "diffusers_fp32" and r["fast_speedup_vs_diffusers_fastest"] == pytest.approx(1.25)
    r = _ratios({"diffusers_fp32": side(10.0), "diffusers_bf16": side(4.0), "diffusers_autocast": side(5.0),
                 "imagine_fast": side(2.0)})
    assert r["diffusers_fastest"] == "diffusers_bf16" and r["fast_speedup_vs_diffusers_fastest"] == pytest.approx(2.0)


@pytest.mark.usefixtures("no_bf16_mode")
def test_speed_bench_leaves_out_emulated_bf16_sides():
    from imagine.bench.speed import default_sides

    assert default_sides() == ["diffusers_fp32", "imagine_exact", "imagine_fast"]
