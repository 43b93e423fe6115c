"""`preprocessors.fit` resizes control maps as the ControlNet extension's `high_quality_resize` (detectmap_proc):
nearest for segmentation-like maps (3..199 colours), cv2 INTER_AREA when shrinking / INTER_CUBIC otherwise, binary
maps kept binary through the channel mean, Otsu's threshold and, for one-pixel lines, NMS + lvmin_thin.

The truth here is the reviewer's restatement of the extension's source (/tmp/review_cn/ext_resize.py), copied
below. OpenCV is not installed, so its cv2 calls go through `_CV`, a small, deliberately plain (per-pixel loops,
scipy's min/max filters) restatement of OpenCV's definitions written apart from imagine's vectorised port."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from imagine import preprocessors as pp

# ---- a plain stand-in for the few cv2 functions the restatement calls --------------------------------------------


class _CV:
    INTER_NEAREST, INTER_CUBIC, INTER_AREA = 0, 2, 3
    MORPH_HITMISS = 7
    THRESH_BINARY, THRESH_OTSU = 0, 8

    @staticmethod
    def _taps(n_src, n_dst, interp, other_axis_grows=False):
        """Per output index: list of (source index, weight), OpenCV's resize.cpp formulas."""
        inv = n_dst / n_src
        scale = 1.0 / inv
        taps = []
        for d in range(n_dst):
            if interp == _CV.INTER_NEAREST:
                taps.append([(min(math.floor(d * scale), n_src - 1), 1.0)])
            elif interp == _CV.INTER_CUBIC:
                fx = np.float32((d + 0.5) * scale - 0.5)
                sx = math.floor(fx)
                x = np.float32(fx - np.float32(sx))
                A = np.float32(-0.75)
                c = [((A * (x + 1) - 5 * A) * (x + 1) + 8 * A) * (x + 1) - 4 * A,
                     ((A + 2) * x - (A + 3)) * x * x + 1,
                     ((A + 2) * (1 - x) - (A + 3)) * (1 - x) * (1 - x) + 1]
                c.append(np.float32(1) - c[0] - c[1] - c[2])
                taps.append([(min(max(sx - 1 + k, 0), n_src - 1), float(np.float32(c[k])))
                             for k in range(4)])
            elif other_axis_grows or n_dst > n_src:  # INTER_AREA's bilinear emulation
                sx = math.floor(d * scale)
                fx = float(np.float32((d + 1) - (sx + 1) * inv))
                fx = 0.0 if fx <= 0 else fx - math.floor(fx)
                if sx >= n_src - 1:
                    sx, fx = n_src - 1, 0.0
                fx = round(fx * 2048) / 2048
                taps.append([(sx, 1 - fx)] + ([(sx + 1, fx)] if sx + 1 < n_src else []))
            else:  # computeResizeAreaTab
                f1 = d * scale
                f2 = f1 + scale
                cell = min(scale, n_src - f1)
                s2 = min(math.floor(f2), n_src - 1)
                s1 = min(math.ceil(f1), s2)
                t = []
                if s1 - f1 > 1e-3:
                    t.append((s1 - 1, float(np.float32((s1 - f1) / cell))))
                t += [(s, float(np.float32(1.0 / cell))) for s in range(s1, s2)]
                if f2 - s2 > 1e-3:
                    t.append((s2, float(np.float32(min(min(f2 - s2, 1.0), cell) / cell))))
                taps.append(t)
        return taps

    @staticmethod
    def resize(x, size, interpolation):
        w, h = size
        h0, w0 = x.shape[:2]
        grows = h > h0 or w > w0
        if interpolation == _CV.INTER_AREA and not grows and h0 % h == 0 and w0 % w == 0:
            ky, kx = h0 // h, w0 // w
            out = np.zeros((h, w, x.shape[2]), np.uint8)
            for i in range(h):
                for j in range(w):
                    s = x[i * ky:(i + 1) * ky, j * kx:(j + 1) * kx].astype(np.int64).sum(axis=(0, 1))
                    out[i, j] = (s + 2) // 4 if ky == kx == 2 else np.rint(s.astype(np.float32) / np.float32(ky * kx))
            return out
        ty = _CV._taps(h0, h, interpolation, grows)
        tx = _CV._taps(w0, w, interpolation, grows)
        if interpolation == _CV.INTER_AREA and grows:  # bilinear in 11-bit fixed point; SIMD vertical pass
            rows = np.stack([sum(round(wt * 2048) * x[:, s].astype(np.int64) for s, wt in t) for t in tx], axis=1)
            out = np.zeros((h, w, x.shape[2]), np.int64)
            for i, t in enumerate(ty):
                for s, wt in t:
                    out[i] += ((rows[s] >> 4) * round(wt * 2048)) >> 16
            return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)
        if interpolation == _CV.INTER_AREA:  # float32 sums in source order
            out = np.zeros((h, w, x.shape[2]), np.float32)
            for i, t in enumerate(ty):
                for j, u in enumerate(tx):
                    for s, wy in t:
                        buf = np.zeros(x.shape[2], np.float32)
                        for r, wx in u:
                            buf += x[s, r].astype(np.float32) * np.float32(wx)
                        out[i, j] += np.float32(wy) * buf
            return np.clip(np.rint(out), 0, 255).astype(np.uint8)
        xf = x.astype(np.float64)
        rows = np.stack([sum(wt * xf[s] for s, wt in t) for t in ty])  # [h, w0, C]
        out = np.stack([sum(wt * rows[:, s] for s, wt in t) for t in tx], axis=1)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    @staticmethod
    def _footprint(kernel, x):
        fp = np.asarray(kernel) != 0
        return fp if x.ndim == 2 else fp[:, :, None]

    @staticmethod
    def erode(x, kernel, iterations=1):
        return ndimage.minimum_filter(x, footprint=_CV._footprint(kernel, x), mode="constant", cval=255)

    @staticmethod
    def dilate(x, kernel, iterations=1):
        return ndimage.maximum_filter(x, footprint=_CV._footprint(kernel, x), mode="constant", cval=0)

    @staticmethod
    def morphologyEx(x, op, kernel):
        assert op == _CV.MORPH_HITMISS
        hit = ndimage.minimum_filter(x, footprint=kernel == 1, mode="constant", cval=255)
        miss = ndimage.minimum_filter(255 - x, footprint=kernel == -1, mode="constant", cval=255)
        return hit & miss

    @staticmethod
    def threshold(x, lo, hi, kind):
        hist = [int((x == i).sum()) for i in range(256)]
        n = x.size
        mu = sum(i * h for i, h in enumerate(hist)) / n
        mu1 = q1 = best = 0.0
        t = 0
        for i in range(256):
            p = hist[i] / n
            mu1 *= q1
            q1 += p
            q2 = 1.0 - q1
            if min(q1, q2) < 1.1920929e-07 or max(q1, q2) > 1.0 - 1.1920929e-07:
                continue
            mu1 = (mu1 + i * p) / q1
            mu2 = (mu - q1 * mu1) / q2
            s = q1 * q2 * (mu1 - mu2) ** 2
            if s > best:
                best, t = s, i
        return t, np.where(x > t, 255, 0).astype(np.uint8)


cv2 = _CV

# ---- the reviewer's restatement of the extension (ext_resize.py), verbatim but for line breaks --------------------


def _k(raw):
    out = []
    for k in range(4):
        out += [np.rot90(x, k=k, axes=(0, 1)) for x in raw]
    return out


KER = _k([np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], np.int32), np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], np.int32)])
PRU = _k([np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], np.int32), np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], np.int32)])


def remove_pattern(x, kernel):
    o = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127)
    x[o] = 0
    return x, o[0].shape[0] > 0


def thin_one(x, ks):
    done = True
    for k in ks:
        x, upd = remove_pattern(x, k)
        done = done and not upd
    return x, done


def lvmin_thin(x, prunings=True):
    for _ in range(32):
        x, done = thin_one(x, KER)
        if done:
            break
    if prunings:
        x, _ = thin_one(x, PRU)
    return x


def nake_nms(x):
    fs = [np.array(a, np.uint8) for a in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                          [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]
    y = np.zeros_like(x)
    for f in fs:
        np.putmask(y, cv2.dilate(x, kernel=f) == x, x)
    return y


def high_quality_resize(x, size):
    if x.shape[0] == size[1] and x.shape[1] == size[0]:
        return x
    smaller = size[0] * size[1] < x.shape[0] * x.shape[1]
    bigger = size[0] * size[1] > x.shape[0] * x.shape[1]
    n = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    one_px = binary = False
    if n == 2:
        binary = np.min(x) < 16 and np.max(x) > 240
        if binary:
            xc = cv2.dilate(cv2.erode(x, np.ones((3, 3), np.uint8), iterations=1), np.ones((3, 3), np.uint8), iterations=1)
            one_px = np.where(xc < x)[0].shape[0] * 2 > np.where(x > 127)[0].shape[0]
    interp = cv2.INTER_NEAREST if 2 < n < 200 else (cv2.INTER_AREA if smaller else cv2.INTER_CUBIC)
    y = cv2.resize(x, size, interpolation=interp)
    if binary:
        y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if one_px:
            y = nake_nms(y)
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = lvmin_thin(y, prunings=bigger)
        else:
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([y] * 3, axis=2)
    return y


# ---- maps ---------------------------------------------------------------------------------------------------------


def _drawing(size: int, seed: int = 0) -> Image.Image:
    g = np.random.default_rng(seed)
    pic = Image.new("RGB", (size, size), (30, 30, 30))
    d = ImageDraw.Draw(pic)
    for _ in range(12):
        x, y = (int(v) for v in g.integers(0, size, 2))
        r = int(g.integers(size // 8, size // 2))
        d.ellipse((x - r, y - r // 2, x + r, y + r // 2), outline=tuple(int(v) for v in g.integers(60, 255, 3)),
                  width=max(1, size // 64))
        d.line((0, int(g.integers(0, size)), size, int(g.integers(0, size))), fill=(220, 40, 40), width=2)
    return pic


def _edges(size: int) -> np.ndarray:
    """A canny map: binary, one-pixel edges."""
    return np.asarray(pp.canny(_drawing(size), 100, 200, size))


def _thick(size: int) -> np.ndarray:
    """A binary map of thick strokes (not one-pixel lines), white on black."""
    pic = Image.new("RGB", (size, size), (0, 0, 0))
    d = ImageDraw.Draw(pic)
    for i in range(0, size, size // 6):
        d.rectangle((i, i // 3, i + size // 10, i // 3 + size // 5), fill=(255, 255, 255))
    return np.asarray(pic)


def _segments(size: int) -> np.ndarray:
    """A segmentation-like map: 7 flat colours."""
    colours = np.array([[120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3],
                        [120, 120, 80], [140, 140, 140]], np.uint8)
    yy, xx = np.mgrid[:size, :size]
    return colours[((xx * 7) // size + (yy * 3) // size + ((xx - yy) > size // 3)) % 7]


def _photo(size: int) -> np.ndarray:
    g = np.random.default_rng(3)
    x = ndimage.gaussian_filter(g.random((size, size, 3)) * 255, (2, 2, 0)) * 3 % 256
    return x.astype(np.uint8)


SIZES = [(64, 32), (64, 16), (32, 64), (60, 45), (48, 70), (64, 41)]  # x2, x4 down, x2 up, non-integer factors


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("kind", ["edges", "thick", "segments", "photo"])
def test_high_quality_resize_matches_the_extension(kind, src, dst):
    x = {"edges": _edges, "thick": _thick, "segments": _segments, "photo": _photo}[kind](src)
    want = high_quality_resize(x.copy(), (dst, dst))
    got = pp.high_quality_resize(x.copy(), (dst, dst))
    assert got.shape == want.shape == (dst, dst, 3) and got.dtype == np.uint8
    if kind == "photo":  # OpenCV's 8-bit fixed point / SIMD rounding is modelled, ties may land a level apart
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
        assert (got != want).mean() < 0.01
    else:
        assert np.array_equal(got, want)
    if kind in ("edges", "thick"):
        assert set(np.unique(got)) <= {0, 255} and got.max() == 255
    if kind == "segments":
        assert set(map(tuple, got.reshape(-1, 3))) <= set(map(tuple, x.reshape(-1, 3)))


@pytest.mark.parametrize("size", [(40, 25), (25, 40), (70, 30)])
def test_non_uniform_resizes_and_the_area_emulation(size):
    """Just Resize to another aspect: one axis grows while the other shrinks (OpenCV's INTER_AREA falls back to its
    bilinear emulation when the area shrinks)."""
    for x in (_photo(48), _edges(48)):
        want, got = high_quality_resize(x.copy(), size), pp.high_quality_resize(x.copy(), size)
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_opencv_values_by_hand():
    # INTER_AREA 2x2: the block mean, rounded half up as OpenCV's SIMD path
    a = np.array([[0, 255], [255, 255]], np.uint8)[:, :, None].repeat(3, 2)
    assert pp.cv_resize(a, (1, 1), "area")[0, 0, 0] == 191
    # INTER_AREA 3 -> 2: fractional cover, weights (1, .5) / 1.5
    b = np.array([[0, 90, 180]], np.uint8)[:, :, None].repeat(3, 2)
    assert list(pp.cv_resize(b, (2, 1), "area")[0, :, 0]) == [30, 150]
    # INTER_CUBIC keeps a flat picture flat and goes through the samples at integer factors' centres
    flat = np.full((5, 7, 3), 77, np.uint8)
    assert (pp.cv_resize(flat, (13, 11), "cubic") == 77).all()
    # Otsu on two levels cuts between them
    assert list(pp.otsu_binary(np.array([10, 10, 200, 200], np.uint8))) == [0, 0, 255, 255]


@pytest.mark.parametrize("mode", pp.RESIZE_MODES)
def test_fit_keeps_edge_maps_as_the_extension(mode):
    """The reviewer's case: a 512 canny map fitted to 128 kept about 1 edge pixel with Lanczos + a 127 cut; the
    extension keeps thin edges. fit = high_quality_resize plus the mode's crop / fill."""
    m = _edges(128)
    got = np.asarray(pp.fit(Image.fromarray(m), 32, 32, mode))
    k = 32 / 128
    want = high_quality_resize(m.copy(), (round(128 * k), round(128 * k)))
    assert np.array_equal(got, want)
    assert (got[..., 0] > 127).sum() > 0.1 * (m[..., 0] > 127).sum() / 4


def test_fit_crops_and_fills_around_the_extension_resize():
    wide = _photo(64)[:32]  # 64 wide, 32 high
    crop = np.asarray(pp.fit(Image.fromarray(wide), 48, 48, "crop_and_resize"))  # k = 1.5: 96 x 48, cut at 24
    want = high_quality_resize(wide.copy(), (96, 48))[:, 24:72]
    assert np.abs(crop.astype(int) - want.astype(int)).max() <= 1
    fill = np.asarray(pp.fit(Image.fromarray(wide), 48, 48, "resize_and_fill"))  # k = .75: 48 x 24, 12 rows down
    want = high_quality_resize(wide.copy(), (48, 24))
    assert np.abs(fill[12:36].astype(int) - want.astype(int)).max() <= 1
    border = np.concatenate([wide[0], wide[-1], wide[:, 0], wide[:, -1]])
    assert np.array_equal(fill[:12], np.broadcast_to(np.median(border, axis=0).astype(np.uint8), (12, 48, 3)))


# ---- where OpenCV itself is at hand (optional): the port against the real cv2 -----------------------------------

OPENCV_SIZES = [(32, 32), (16, 16), (128, 128), (45, 45), (70, 70), (41, 41), (40, 25), (70, 30), (100, 40)]


@pytest.mark.parametrize("kind", ["photo", "segments", "edges"])
def test_cv_resize_against_opencv(kind):
    real = pytest.importorskip("cv2")
    x = {"photo": _photo(64), "segments": _segments(64), "edges": _edges(60)}[kind]
    for size in OPENCV_SIZES:
        for name, flag in (("nearest", real.INTER_NEAREST), ("area", real.INTER_AREA), ("cubic", real.INTER_CUBIC)):
            want = real.resize(x, size, interpolation=flag).astype(int)
            got = pp.cv_resize(x, size, name).astype(int)
            if name == "cubic":  # OpenCV's 8-bit cubic rounding: ties (many on a 0/255 map) may land a level apart
                assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.02, (name, size)
            else:
                assert np.array_equal(got, want), (name, size)


@pytest.mark.parametrize("kind", ["edges", "thick", "segments"])
def test_high_quality_resize_against_the_restatement_on_opencv(kind):
    real = pytest.importorskip("cv2")
    x = {"edges": _edges(64), "thick": _thick(64), "segments": _segments(64)}[kind]
    global cv2
    try:
        cv2 = real
        for size in OPENCV_SIZES:
            want = high_quality_resize(x.copy(), size)
            got = pp.high_quality_resize(x.copy(), size)
            assert (got != want).mean() < 0.002, size  # (a cubic tie can move an edge pixel when growing)
            if size[0] * size[1] < 64 * 64:
                assert np.array_equal(got, want), size
    finally:
        cv2 = _CV
