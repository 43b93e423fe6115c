"""GroupNorm (+ SiLU) for the bf16 fast copies (imagine/models/group_norm.py): the kernel against float64
GroupNorm and SiLU of the same bf16 map, on the VAE's and U-Net's shapes and on awkward ones (channel
counts that are not a multiple of 16, one pixel, channels whose mean is far from zero); its error must be
within bf16's rounding and no worse than torch's bf16 ops. Where the kernel does not apply (float32,
autograd, NCHW, the switch off) torch's ops give their own answer. The kernel runs where the CPU has
AVX512-BF16; those tests are skipped elsewhere."""

import pytest
import torch
import torch.nn.functional as F

from imagine.models import group_norm as gn_module
from imagine.models import native
from imagine.models.group_norm import group_norm, silu_of_norm

CL = torch.channels_last
needs_kernel = pytest.mark.skipif(not native.has_cpu_flags(gn_module.NEEDS), reason="needs a CPU with AVX512-BF16")
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _norm(c, groups, affine=True, seed=0):
    torch.manual_seed(seed)
    norm = torch.nn.GroupNorm(groups, c, eps=1e-6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.5), norm.bias.normal_(0.0, 0.5)
    return norm


def _map(b, c, h, w, offset=0.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    # offset: a mean shared by the channels of a group, far from zero next to the spread (2 and 1%)
    x = torch.randn(b, c, h, w, generator=g) * 2 + offset * (1 + 0.01 * torch.randn(1, c, 1, 1, generator=g))
    return x.bfloat16().contiguous(memory_format=CL)


@needs_kernel
@pytest.mark.parametrize("b, c, groups, h, w, offset, affine", [
    (1, 512, 32, 32, 32, 0.0, True),  # the VAE decoder's deep maps
    (2, 320, 32, 16, 16, 0.0, True),  # the U-Net's top level, a guidance batch
    (1, 128, 32, 40, 24, 0.0, True),
    (2, 48, 16, 7, 9, 0.0, True),  # 48 channels: 3 per group, a 16-wide tail of lanes
    (1, 40, 8, 5, 3, 0.0, True),  # 40 = 2 x 16 + 8: a masked tail
    (1, 64, 32, 1, 1, 0.0, True),  # one pixel: 2 values per group
    (1, 96, 32, 33, 17, 200.0, True),  # a mean 100x the spread (E[x^2] - E[x]^2 cancels 4 digits)
    (1, 32, 32, 128, 128, 200.0, True),  # the same over 16384 pixels: many float32 blocks, 4 chunks
    (2, 64, 4, 12, 12, 0.0, False),  # no affine weights
])
@pytest.mark.parametrize("silu", [True, False])
def test_kernel_matches_float64_within_bf16_rounding(b, c, groups, h, w, offset, affine, silu):
    norm = _norm(c, groups, affine)
    x = _map(b, c, h, w, offset)
    fast = _norm(c, groups, affine).bfloat16()
    with torch.inference_mode():
        got = group_norm(fast, x, silu=silu)
        truth = norm.double()(x.double())
        truth = F.silu(truth) if silu else truth
        torch_bf16 = fast(x)
        torch_bf16 = F.silu(torch_bf16) if silu else torch_bf16
    assert got.dtype == torch.bfloat16 and got.shape == x.shape and got.is_contiguous(memory_format=CL)
    assert _rel(got, truth) < 4e-3  # bf16's rounding of the output (2^-9) and of the affine weights
    assert _rel(got, truth) <= 1.05 * _rel(torch_bf16, truth) + 1e-4


@needs_kernel
def test_in_place_writes_over_the_map_and_equals_the_functional_op():
    norm = _norm(64, 32).bfloat16()
    x = _map(2, 64, 10, 10)
    with torch.inference_mode():
        want = silu_of_norm(norm, x)
        mine = x.clone()
        got = silu_of_norm(norm, mine, inplace=True)
    assert got.data_ptr() == mine.data_ptr() and torch.equal(got, want)
    assert not torch.equal(x, want)  # the functional op left its input alone


@needs_kernel
def test_the_kernel_runs_where_it_applies():
    """The fast copies' case takes the kernel (it counts as a call of the op under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    norm = _norm(64, 32).bfloat16()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        silu_of_norm(norm, _map(1, 64, 8, 8))
    assert any(e.key == "imagine::group_norm_silu" for e in prof.key_averages())


@pytest.mark.parametrize("case", ["float32", "nchw", "autograd", "switched off"])
def test_torch_serves_where_the_kernel_does_not_apply(case, monkeypatch):
    norm = _norm(32, 8)
    x = torch.randn(2, 32, 6, 6)
    if case != "float32":
        norm = norm.bfloat16()
        x = x.bfloat16()
    if case not in ("nchw",):
        x = x.contiguous(memory_format=CL)
    if case == "switched off":
        monkeypatch.setenv(gn_module.ENV, "0")
    if case == "autograd":
        x.requires_grad_(True)
        y = silu_of_norm(norm, x)
        y.float().sum().backward()
        assert x.grad is not None
        assert torch.equal(y.detach(), F.silu(norm(x)).detach())
        return
    with torch.inference_mode():
        assert torch.equal(silu_of_norm(norm, x), F.silu(norm(x)))
        assert torch.equal(group_norm(norm, x), norm(x))


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """torch's extension builder waits forever for a lock a killed build left: imagine removes a lock no process
    holds open (however young), and, where that cannot be told, one older than a build could take; a lock held
    open (a build in progress in another process) is left alone."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory("imagine_test_kernel", False), "lock")
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # held, as torch's builder holds it while it builds
    try:
        assert not native.remove_stale_lock("imagine_test_kernel") and os.path.exists(lock)
    finally:
        os.close(fd)
    with pytest.warns(RuntimeWarning, match="no process has it open"):  # its builder was killed a moment ago
        assert native.remove_stale_lock("imagine_test_kernel")
    assert not os.path.exists(lock)
    monkeypatch.setattr(native, "lock_holders", lambda lock: None)  # no /proc to tell: the age decides
    open(lock, "w").close()
    assert not native.remove_stale_lock("imagine_test_kernel") and os.path.exists(lock)
    old = time.time() - native.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="did not finish"):
        assert native.remove_stale_lock("imagine_test_kernel")
    assert not os.path.exists(lock)
    assert not native.remove_stale_lock("imagine_test_kernel")  # no lock: nothing to do
