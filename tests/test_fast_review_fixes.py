"""The CPU fast mode's review findings: a killed kernel build's lock, stale packs at reused addresses, stale
copies kept while their replacement is built, the Winograd budget's races and history, inference-mode copies,
GEGLU's bias, the attention kernel's shapes, empty batches."""

from __future__ import annotations

import copy
import os
import threading
import time
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imagine.models import native, winograd
from imagine.models.winograd import WinogradConv2d, use_winograd, winograd_conv3x3, winograd_filter

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _tiny_unet(seed=0):
    from imagine.models.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(seed)
    cfg = UNetConfig(block_out_channels=(256, 256), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                     cross_attention_dim=32, attention_head_dim=4)
    return UNet2DConditionModel(cfg).eval().requires_grad_(False)


def _run_with_timeout(fn, seconds):
    """fn() on a daemon thread; (finished, result or exception). A hang leaves the thread behind, not the test."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if "error" in box:
        raise box["error"]
    return not t.is_alive(), box.get("result")


# -- 2. a build killed with its lock file left behind ------------------------------------------------------------


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(native, "LOCK_POLL_SECONDS", 0.05, raising=False)
    return tmp_path / "ext"


def _torch_like_load(calls, take_lock_first=None):
    """A stand-in for torch.utils.cpp_extension.load with its lock logic (`_jit_compile`): try to take the build
    directory's lock, else wait on it with cpp_extension.FileBaton's wait (torch's own spins while the file exists)."""
    from torch.utils import cpp_extension

    def load(name, **kw):
        lock = os.path.join(cpp_extension._get_build_directory(name, False), "lock")
        if take_lock_first is not None:  # another process takes the lock in the moment before ours, and is killed
            take_lock_first(lock)
        baton = cpp_extension.FileBaton(lock)
        if baton.try_acquire():
            baton.release()
        else:
            baton.wait()
        calls.append(name)

    return load


def _kernel(name):
    return native.Kernel(name, "group_norm_silu.cpp", (), what="a test kernel", fallback="the test's fallback",
                         env="IMAGINE_TEST_KERNEL")


def _left_lock(name):
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, False), "lock")
    open(lock, "w").close()  # what a build killed by SIGTERM leaves: a young lock that nobody holds
    return lock


def test_a_killed_builds_young_lock_does_not_hang_the_next_load(ext_dir, monkeypatch):
    """The lock of a build killed a moment ago (younger than any age rule) is held by no process: it is removed at
    once, and the kernel builds (before, the next process waited on it forever)."""
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", _torch_like_load(calls))
    kernel = _kernel("imagine_test_killed_lock")
    lock = _left_lock(kernel.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finished, loaded = _run_with_timeout(kernel.load, 30)
    assert finished, "the load waited on a dead build's lock"
    assert loaded and calls == [kernel.name] and not os.path.exists(lock)
    assert any("removing" in str(w.message) and "no process has it open" in str(w.message) for w in caught)
    open(lock, "w").close()
    assert native.lock_holders(Path(lock)) is False


def test_a_lock_taken_just_before_torchs_builder_is_waited_on_with_a_bound_too(ext_dir, monkeypatch):
    """A process that takes the lock between our check and torch's own (and is killed) leaves torch's FileBaton
    waiting: while our build runs, torch's builder waits with our bounded, stale-aware wait."""
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load",
                        _torch_like_load(calls, take_lock_first=lambda lock: open(lock, "w").close()))
    kernel = _kernel("imagine_test_raced_lock")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finished, _ = _run_with_timeout(kernel.load, 30)
    assert finished, "torch's builder waited on a dead build's lock"
    assert calls == [kernel.name]
    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    assert cpp_extension.FileBaton is FileBaton  # put back after the build


def test_a_live_builds_lock_is_waited_for_until_the_deadline_then_the_fallback_serves(ext_dir, monkeypatch, capfd):
    """A lock some process holds open is a build in progress: waited for, with one message, and after
    LOCK_WAIT_SECONDS the kernel counts as failed (its fallback serves), not forever."""
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", _torch_like_load(calls))
    monkeypatch.setattr(native, "LOCK_WAIT_SECONDS", 0.5, raising=False)
    kernel = _kernel("imagine_test_live_lock")
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(kernel.name, False), "lock")
    fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # held open, as torch's builder holds it while it builds
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.monotonic()
            finished, loaded = _run_with_timeout(kernel.load, 30)
        assert finished and time.monotonic() - t0 < 20
        assert loaded is False and kernel.failed and calls == [] and os.path.exists(lock)
        assert any("TimeoutError" in str(w.message) and "the test's fallback" in str(w.message) for w in caught)
        assert capfd.readouterr().err.count("waiting for another process's build") == 1
        assert native.lock_holders(Path(lock)) is True
    finally:
        os.close(fd)


@pytest.mark.parametrize("age, removed", [(10, False), (native.STALE_LOCK_SECONDS + 60, True)])
def test_where_the_holders_cannot_be_read_the_locks_age_decides(ext_dir, monkeypatch, age, removed):
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load", _torch_like_load(calls))
    monkeypatch.setattr(native, "LOCK_WAIT_SECONDS", 0.3, raising=False)
    monkeypatch.setattr(native, "lock_holders", lambda lock: None, raising=False)
    kernel = _kernel(f"imagine_test_unknown_lock_{age}")
    lock = _left_lock(kernel.name)
    os.utime(lock, (time.time() - age, time.time() - age))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finished, loaded = _run_with_timeout(kernel.load, 30)
    assert finished and loaded is removed and os.path.exists(lock) is not removed


# -- 3. a stale pack at a reused address -------------------------------------------------------------------------


def test_a_pack_keeps_the_storage_of_the_weight_it_came_from():
    """Replacing a weight's .data keeps its version counter; were the old storage freed, the allocator could give
    the new weight its address and the stamp would match: the pack's stamp holds the old storage instead."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from imagine.models.prepacked import use_prepacked

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64).requires_grad_(False)
    use_prepacked(lin)
    x = torch.randn(8, 64)
    with torch.no_grad():
        lin(x)
        old = StorageWeakRef(lin.weight.untyped_storage())
        lin.weight.data = torch.empty(0)
        assert not old.expired()  # pinned by the pack's stamp


@pytest.mark.parametrize("n", [64, 320])
def test_a_replaced_weight_never_reuses_a_stale_pack(n):
    from imagine.models.prepacked import use_prepacked

    torch.manual_seed(0)
    for _ in range(20):
        lin = torch.nn.Linear(n, n).requires_grad_(False)
        use_prepacked(lin)
        x = torch.randn(8, n)
        with torch.no_grad():
            lin(x)
            lin.weight.data = torch.empty(0)  # the old weight's storage is let go ...
            w = torch.empty(n, n)  # ... and a new one is allocated (glibc hands back the same block)
            w.normal_()
            lin.weight.data = w
            assert _rel(lin(x), F.linear(x, lin.weight, lin.bias)) < 1e-5


def test_a_winograd_layer_and_a_cached_copy_pin_their_weights_too():
    from torch.multiprocessing.reductions import StorageWeakRef

    from imagine.pipelines.text_to_image import _EXACT_COPIES, exact_copy

    conv = torch.nn.Conv2d(256, 8, 3, padding=1).requires_grad_(False)
    use_winograd(conv, budget_bytes=2**30)
    with torch.no_grad():
        conv(torch.randn(1, 256, 8, 8))
        old = StorageWeakRef(conv.weight.untyped_storage())
        conv.weight.data = torch.empty(0)
        assert not old.expired()
    net = torch.nn.Sequential(torch.nn.Linear(16, 16)).requires_grad_(False)
    exact_copy(net)
    if net in _EXACT_COPIES:
        old = StorageWeakRef(net[0].weight.untyped_storage())
        net[0].weight.data = torch.empty(0)
        assert not old.expired()


# -- 4. the stale copy is dropped before its replacement is built -------------------------------------------------


@pytest.mark.usefixtures("no_bf16_mode")
def test_a_rebuilt_fast_copy_is_made_without_the_stale_one_and_gets_the_same_budget(monkeypatch):
    from imagine.pipelines import text_to_image
    from imagine.pipelines.text_to_image import _Autocast, fast_copy

    monkeypatch.delenv(winograd.BUDGET_ENV, raising=False)
    monkeypatch.setattr(winograd, "_CONVERTED", weakref.WeakSet())
    unet = _tiny_unet()
    layers = winograd.winograd_candidates(unet)
    f4 = sum(winograd.filter_bytes(m.weight, 4) for m in layers)
    # Half of this covers every F(4x4) U and F(6x6) for some layers only: the budget decides the tiles.
    monkeypatch.setattr(winograd, "_available_bytes", lambda: int(2.6 * f4))
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([500.0]), torch.randn(1, 6, 32)
    with torch.inference_mode():
        first = _Autocast(unet, compile=False)(x, t, context=ctx)
    old = fast_copy(unet)

    def grants(c):  # the memory each layer was given, and what stays shared
        convs = [m for m in c.modules() if isinstance(m, WinogradConv2d)]
        return [m._reserved + sum(u.numel() * u.element_size() for u in (m._u or {}).values()) for m in convs], \
            convs[0]._budget.free

    old_grants = grants(old)
    old_tiles = [getattr(m, "_tiles", None) for m in old.modules() if isinstance(m, WinogradConv2d)]
    stale = weakref.ref(old)
    del old
    seen = []
    sharing_copy = text_to_image._sharing_copy
    monkeypatch.setattr(text_to_image, "_sharing_copy", lambda m: (seen.append(stale() is None), sharing_copy(m))[1])
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.0)  # a change the version counters show, that leaves the values as they were
    with torch.inference_mode():
        second = _Autocast(unet, compile=False)(x, t, context=ctx)
    assert seen == [True]  # the stale copy was gone before the new one was made
    assert grants(fast_copy(unet)) == old_grants and torch.equal(first, second)
    new_tiles = [m._tiles for m in fast_copy(unet).modules() if isinstance(m, WinogradConv2d)]
    assert new_tiles == old_tiles and {6} & set().union(*new_tiles) and not all(6 in s for s in new_tiles)


# -- 5. fast_copy looks in its cache before it looks at the memory --------------------------------------------------


@pytest.mark.usefixtures("no_bf16_mode")
def test_the_float32_fast_copy_stays_when_the_memory_available_drops(monkeypatch):
    from imagine.pipelines.text_to_image import exact_copy, fast_copy

    monkeypatch.delenv(winograd.BUDGET_ENV, raising=False)
    monkeypatch.setattr(winograd, "_CONVERTED", weakref.WeakSet())
    avail = {"now": 16 * 2**30}
    monkeypatch.setattr(winograd, "_available_bytes", lambda: avail["now"])
    unet = _tiny_unet()
    made = fast_copy(unet)
    assert made is not exact_copy(unet) and any(isinstance(m, WinogradConv2d) for m in made.modules())
    avail["now"] = 1 * 2**30  # less than the copy itself promised: a new copy would get no budget
    assert winograd.default_budget_bytes() == 0
    assert fast_copy(unet) is made
    avail["now"] = 16 * 2**30
    assert fast_copy(unet) is made
    other = _tiny_unet(1)  # a copy made under no budget: the exact one, until there is memory
    avail["now"] = 1 * 2**30
    assert fast_copy(other) is exact_copy(other)


# -- 6. a copy first made under inference_mode serves autograd later ------------------------------------------------


@pytest.mark.parametrize("mode", ["no_bf16_mode", "bf16_mode"])
def test_a_fast_copy_first_made_under_inference_mode_serves_autograd(request, mode):
    from imagine.pipelines.text_to_image import _Autocast, fast_copy

    request.getfixturevalue(mode)
    unet = _tiny_unet()
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 6, 32)
    with torch.inference_mode():
        _Autocast(unet, compile=False)(x, t, context=ctx)  # makes the copy, its packs and its Winograd filters
    made = fast_copy(unet)
    assert not any(p.is_inference() for p in made.parameters())
    convs = [m for m in made.modules() if isinstance(m, WinogradConv2d)]
    assert convs and any(m._u for m in convs)
    assert not any(u.is_inference() for m in convs for u in (m._u or {}).values())
    xg = x.clone().requires_grad_()
    out = _Autocast(unet, compile=False)(xg, t, context=ctx)
    out.square().sum().backward()
    xe = x.clone().requires_grad_()
    unet(xe, t, context=ctx).square().sum().backward()
    assert torch.isfinite(xg.grad).all() and _rel(xg.grad, xe.grad) < (5e-2 if mode == "bf16_mode" else 1e-4)


# -- 7. two threads' first calls build one U and charge it once -----------------------------------------------------


def test_two_threads_first_calls_build_one_filter_and_charge_it_once(monkeypatch):
    slow = winograd.winograd_filter

    def slow_filter(*a, **kw):  # widens the window in which both threads find no U
        time.sleep(0.2)
        return slow(*a, **kw)

    monkeypatch.setattr(winograd, "winograd_filter", slow_filter)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).requires_grad_(False)
    f4 = winograd.filter_bytes(conv.weight, 4)
    use_winograd(conv, budget_bytes=3 * f4)
    before = conv._reserved + conv._budget.free
    x = torch.randn(1, 256, 16, 16)
    outs, barrier = [None, None], threading.Barrier(2)

    def run(i):
        barrier.wait()
        with torch.inference_mode():
            outs[i] = conv(x)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    held = winograd.winograd_bytes(conv)
    assert sorted(conv._u) == [4] and held == f4
    assert before - conv._reserved - conv._budget.free == held  # charged once
    assert torch.equal(outs[0], outs[1])


# -- 8. a map's tile does not depend on what ran before --------------------------------------------------------------


def test_a_maps_tile_does_not_depend_on_the_maps_before_it():
    torch.manual_seed(0)
    base = torch.nn.Conv2d(256, 256, 3, padding=1).requires_grad_(False)
    budget = winograd.filter_bytes(base.weight, 6)  # F(4x4)'s reservation and just enough more for F(6x6)
    x_small, x_large = torch.randn(1, 256, 16, 16), torch.randn(1, 256, 48, 48)
    fresh, used = copy.deepcopy(base), copy.deepcopy(base)
    use_winograd(fresh, budget_bytes=budget)
    use_winograd(used, budget_bytes=budget)
    with torch.inference_mode():
        a = fresh(x_small)
        big = used(x_large)
        b = used(x_small)
        assert torch.equal(used(x_large), big)
    assert torch.equal(a, b)


def test_which_layers_get_the_larger_tile_does_not_depend_on_which_ran_first():
    """Two layers, memory for one F(6x6) U: the smaller weight gets it, whichever layer runs a large map first
    (before, the first to run one did)."""
    torch.manual_seed(0)
    small, large = torch.nn.Conv2d(256, 8, 3, padding=1), torch.nn.Conv2d(256, 16, 3, padding=1)
    f = winograd.filter_bytes
    budget = f(small.weight, 4) + f(large.weight, 4) + (f(large.weight, 6) - f(large.weight, 4))
    x = torch.randn(1, 256, 48, 48)
    results = []
    for order in ((0, 1), (1, 0)):
        net = copy.deepcopy(torch.nn.Sequential(small, large)).requires_grad_(False)
        assert use_winograd(net, budget_bytes=budget) == 2
        with torch.inference_mode():
            outs = {i: net[i](x) for i in order}
        results.append((net, outs[0], outs[1]))
    (net_a, a0, a1), (net_b, b0, b1) = results
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert [m._tiles for m in net_a] == [m._tiles for m in net_b] == [{2, 4, 6}, {2, 4}]


def test_sd15_unet_tiles_at_512_are_as_before(monkeypatch):
    """SD 1.5's U-Net at 512x512 (64x64 latents), with 250 MB over its F(4x4) filters' 7.8 GB (the 24 GB bench
    machine's bf16 copy had 300-750 MB, as busy as the machine was): all 48 eligible convolutions converted,
    F(6x6) for the 12 on 64x64 maps, F(4x4) on 32x32 and 16x16, F(2x2) on 8x8 (the bench's tiles). Shapes only,
    on the meta device."""
    from imagine.models.unet import UNet2DConditionModel, UNetConfig

    monkeypatch.setattr(winograd, "_CONVERTED", weakref.WeakSet())

    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig(cross_attention_dim=768, attention_head_dim=8))
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.setdefault(m, tuple(a[0].shape[-2:])) and None)
             for m in winograd.winograd_candidates(unet)]
    with torch.device("meta"), torch.no_grad():
        unet(torch.empty(2, 4, 64, 64), torch.empty(2), context=torch.empty(2, 77, 768))
    [h.remove() for h in hooks]
    f4 = sum(winograd.filter_bytes(m.weight, 4) for m in seen)
    assert use_winograd(unet, budget_bytes=f4 + 250 * 2**20) == 48
    tiles = {m: m.tile_for(*hw) for m, hw in seen.items()}
    assert sum(t == 6 for t in tiles.values()) == 12
    assert all(t == (6 if hw[0] == 64 else 4 if hw[0] >= 16 else 2) for (m, t), hw in zip(tiles.items(), seen.values()))


# -- 9. GEGLU's bias -------------------------------------------------------------------------------------------------


def test_packed_geglu_sees_a_replaced_bias():
    from imagine.models.attention import GEGLU
    from imagine.models.prepacked import use_prepacked

    torch.manual_seed(0)
    g = GEGLU(32, 16).eval().requires_grad_(False)
    ref = copy.deepcopy(g)
    use_prepacked(g)
    x = torch.randn(4, 32)
    with torch.no_grad():
        g(x)
        for m in (g, ref):
            m.proj.bias = torch.nn.Parameter(torch.randn(32, generator=torch.Generator().manual_seed(1)),
                                             requires_grad=False)
        assert _rel(g(x), ref(x)) < 1e-5
        for m in (g, ref):
            m.proj.bias.add_(1.0)  # in place: the pack's bias halves are views of it
        assert _rel(g(x), ref(x)) < 1e-5


# -- 10. the attention kernel is asked only for what it takes ---------------------------------------------------------


def test_attention_kernel_applies_only_to_matching_shapes():
    from imagine.models import fused_attention as fa

    q = torch.randn(1, 1, 4, 16).bfloat16()
    k = torch.randn(1, 1, 5, 16).bfloat16()
    assert fa.applies(q, k, k)
    assert not fa.applies(q, k, torch.randn(1, 1, 5, 8).bfloat16())  # v's head size differs (SDPA takes it)
    assert not fa.applies(q, torch.randn(1, 1, 5, 8).bfloat16(), torch.randn(1, 1, 5, 8).bfloat16())
    assert not fa.applies(q, k, torch.randn(1, 1, 6, 16).bfloat16())  # as many values as keys
    assert not fa.applies(q, k[0], k)
    assert not fa.applies(torch.randn(1, 1, 4, 0).bfloat16(), *(torch.randn(1, 1, 5, 0).bfloat16(),) * 2)
    assert fa.attention(q, k, torch.randn(1, 1, 5, 8).bfloat16()) is None  # the caller's SDPA, no error


# -- 11. empty batches -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["1", "0"])
@pytest.mark.parametrize("tile", [2, 4, 6])
def test_winograd_takes_an_empty_batch(monkeypatch, kernel, tile):
    monkeypatch.setenv(winograd.KERNEL_ENV, kernel)
    w = torch.randn(8, 6, 3, 3)
    for x in (torch.randn(0, 6, 9, 11), torch.randn(0, 6, 9, 11).contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            y = winograd_conv3x3(x, winograd_filter(w, tile), torch.randn(8))
        assert y.shape == (0, 8, 9, 11) and y.dtype == x.dtype


def test_winograd_layer_takes_an_empty_batch():
    conv = torch.nn.Conv2d(256, 16, 3, padding=1).requires_grad_(False)
    use_winograd(conv, budget_bytes=2**30)
    with torch.inference_mode():
        y = conv(torch.randn(0, 256, 16, 16))
    assert y.shape == (0, 16, 16, 16) and not conv._u
