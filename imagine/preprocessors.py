"""ControlNet preprocessors without a model ("annotators", Zhang et al. 2023, sec. 4): the control picture made from a
photo, as AUTOMATIC1111's ControlNet extension makes it before the ControlNet sees it.

- `canny`: Canny's edge detector (Canny 1986), OpenCV's `cv2.Canny(image, low, high)` as the extension calls it on
  the RGB picture: 3x3 Sobel derivatives (replicated border) per channel, at each pixel the channel of the largest
  L1 magnitude |dx| + |dy|, non-maximum suppression across the edge (the direction quantised to 0/45/90/135 degrees
  by tan 22.5 and tan 67.5, with OpenCV's strict / non-strict comparisons), then hysteresis: pixels above `high`
  are edges, and pixels above `low` that survived suppression join them through 8-connected neighbours. White
  edges on black. tests/test_preprocessors.py compares it with OpenCV pixel for pixel.
- `invert`: 255 - x, for line art drawn black on white (the extension's "invert (from white bg & black line)").

Resolution and fit, as the extension: a preprocessor runs on the picture resized so that its short side is
`resolution` (512), and the map is then fitted to the image's size by `fit`: "just_resize" (stretched),
"crop_and_resize" (scaled to cover, centre cut: the extension's default) or "resize_and_fill" (scaled to fit inside,
the rest filled with the median colour of the map's border).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")
# AUTOMATIC1111 ControlNet extension's names for them (its API takes the label or the index)
A1111_RESIZE_MODES = {"just resize": "just_resize", "crop and resize": "crop_and_resize",
                      "inner fit (scale to fit)": "crop_and_resize", "scale to fit (inner fit)": "crop_and_resize",
                      "resize and fill": "resize_and_fill", "outer fit (shrink to fit)": "resize_and_fill",
                      "envelope (outer fit)": "resize_and_fill",
                      "0": "just_resize", "1": "crop_and_resize", "2": "resize_and_fill", "3": "just_resize"}
MAX_PIXELS = 4096 * 4096  # the largest picture a preprocessor works on (a thin picture grows along its long side)
TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)  # tan(22.5 deg) in OpenCV's 15-bit fixed point


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of an [H, W, C] int32 picture with a replicated border (OpenCV's Canny border)."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]

    def at(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return gx, gy


def canny_edges(pixels: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """Canny's edges of an [H, W] or [H, W, C] uint8 array -> [H, W] uint8 (255 = edge), as cv2.Canny(pixels, low,
    high) with its default 3x3 aperture and L1 gradient."""
    from scipy import ndimage

    x = np.asarray(pixels)
    if x.dtype != np.uint8 or x.ndim not in (2, 3):
        raise ValueError(f"canny: expected an [H, W] or [H, W, C] uint8 picture; got {x.dtype} {x.shape}")
    if x.ndim == 2:
        x = x[..., None]
    low, high = sorted((float(low), float(high)))
    low, high = int(np.floor(low)), int(np.floor(high))
    gx, gy = _sobel(x.astype(np.int32))
    mag_c = np.abs(gx) + np.abs(gy)
    pick = np.argmax(mag_c, axis=2)[..., None]  # the first channel of the largest magnitude
    dx, dy = (np.take_along_axis(g, pick, axis=2)[..., 0] for g in (gx, gy))
    mag = np.take_along_axis(mag_c, pick, axis=2)[..., 0]
    h, w = mag.shape
    m = np.pad(mag, 1)  # zeros around: the border's neighbours count as 0

    def nb(dy_: int, dx_) -> np.ndarray:
        if isinstance(dx_, np.ndarray):  # a per-pixel column offset (the diagonal's sign)
            rows = np.arange(h)[:, None] + 1 + dy_
            cols = np.arange(w)[None, :] + 1 + dx_
            return m[rows, cols]
        return m[1 + dy_: 1 + dy_ + h, 1 + dx_: 1 + dx_ + w]

    ax, ay = np.abs(dx).astype(np.int64), np.abs(dy).astype(np.int64) << 15
    tg22x = ax * TG22
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x  # the gradient is near the x axis: compare left and right
    vertical = ~horizontal & (ay > tg67x)  # near the y axis: above and below
    diagonal = ~horizontal & ~vertical
    s = np.where((dx ^ dy) < 0, -1, 1)
    keep = np.where(horizontal, (mag > nb(0, -1)) & (mag >= nb(0, 1)),
                    np.where(vertical, (mag > nb(-1, 0)) & (mag >= nb(1, 0)),
                             diagonal & (mag > nb(-1, -s)) & (mag > nb(1, s))))
    candidate = (mag > low) & keep
    strong = candidate & (mag > high)
    # hysteresis: the 8-connected groups of candidates that hold a strong pixel
    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    grown = np.isin(labels, np.unique(labels[strong]))
    return np.where(grown & candidate, 255, 0).astype(np.uint8)


def hwc3(picture: Image.Image) -> np.ndarray:
    """A picture as [H, W, 3] uint8 RGB; one with transparency laid over white (the extension's HWC3)."""
    if picture.mode in ("RGBA", "LA") or (picture.mode == "P" and "transparency" in picture.info):
        rgba = np.asarray(picture.convert("RGBA")).astype(np.float32)
        alpha = rgba[..., 3:] / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(picture.convert("RGB"))


def _scaled_size(h: int, w: int, resolution: int) -> tuple[int, int]:
    """(width, height) of a picture scaled so that its short side is `resolution`; ValueError past MAX_PIXELS."""
    k = resolution / min(h, w)
    size = (max(1, int(np.round(w * k))), max(1, int(np.round(h * k))))
    if size[0] * size[1] > MAX_PIXELS:
        raise ValueError(f"a {w}x{h} picture at resolution {resolution} (its short side) would be {size[0]}x{size[1]}; "
                         f"the preprocessors work on at most {MAX_PIXELS} pixels: give a lower resolution or a less "
                         "elongated picture")
    return size


def _at_resolution(x: np.ndarray, resolution: int) -> np.ndarray:
    """The picture scaled so that its short side is `resolution` (the extension's resize_image_with_pad: cv2
    INTER_CUBIC up, INTER_AREA down, `cv_resize`), then padded with its edge to a multiple of 64 at the bottom and
    right."""
    h, w = x.shape[:2]
    k = resolution / min(h, w)
    size = _scaled_size(h, w, resolution)
    if size != (w, h):
        x = cv_resize(x, size, "cubic" if k > 1 else "area")
    pad = [(0, -n % 64) for n in x.shape[:2]] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, pad, mode="edge")


def canny(picture: Image.Image, low: float = 100, high: float = 200, resolution: int = 512) -> Image.Image:
    """The extension's "canny": the picture at `resolution` (short side), its Canny edges (`canny_edges`), as an RGB
    picture of that size (the padding taken off)."""
    x = hwc3(picture)
    size = _scaled_size(*x.shape[:2], resolution)
    edges = canny_edges(_at_resolution(x, resolution), low, high)[: size[1], : size[0]]
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=2))


def invert(picture: Image.Image) -> Image.Image:
    """The extension's "invert (from white bg & black line)": 255 - x."""
    return Image.fromarray(255 - hwc3(picture))


# name -> (A1111's label, function, (resolution slider or None, slider a, slider b)): a slider is (label, default,
# min, max, step); the extension's API lists them in /controlnet/module_list and resets a value out of range to its
# default
RESOLUTION = ("Resolution", 512, 64, 2048, 8)
PREPROCESSORS = {
    "none": ("none", None, (None, None, None)),
    "canny": ("canny", canny, (RESOLUTION, ("Low Threshold", 100, 1, 255, 1), ("High Threshold", 200, 1, 255, 1))),
    "invert": ("invert (from white bg & black line)", invert, (None, None, None)),
}


def find_preprocessor(name: str | None) -> str:
    """A preprocessor's name from its name or A1111 label (any case); ValueError naming the valid ones."""
    key = str(name or "none").strip().lower()
    for n, (label, _, _) in PREPROCESSORS.items():
        if key in (n, label.lower()):
            return n
    valid = ", ".join(f"{n!r}" for n in PREPROCESSORS)
    raise ValueError(f"preprocessor {name!r} is not one imagine runs; valid: {valid} (model-based ones, depth, pose "
                     "and the like, are not here: send their map already made, with 'none')")


def settings(name: str, resolution: float = -1, threshold_a: float = -1, threshold_b: float = -1,
             free_resolution: bool = False) -> dict:
    """The preprocessor's keyword settings, each value out of its slider's range (-1: not given) replaced by the
    slider's default, as the extension resolves them; `free_resolution`: a resolution of 1 or more is kept as it is
    (pixel perfect's, which the extension sets past its slider)."""
    _, _, sliders = PREPROCESSORS[find_preprocessor(name)]
    out = {}
    for key, slider, value in zip(("resolution", "low", "high"), sliders, (resolution, threshold_a, threshold_b)):
        if slider is not None:
            _, default, lo, hi, _ = slider
            if key == "resolution" and free_resolution and isinstance(value, (int, float)) and value >= 1:
                lo, hi = 1, float("inf")
            out[key] = value if isinstance(value, (int, float)) and lo <= value <= hi else default
    if "resolution" in out:
        out["resolution"] = int(out["resolution"])
    return out


def preprocess(name: str | None, picture: Image.Image, resolution: float = -1, threshold_a: float = -1,
               threshold_b: float = -1, free_resolution: bool = False) -> Image.Image:
    """The control picture `name` makes of `picture` (name "none": the picture itself, as RGB); the settings as
    `settings` resolves them."""
    key = find_preprocessor(name)
    fn = PREPROCESSORS[key][1]
    if fn is None:
        return Image.fromarray(hwc3(picture))
    return fn(picture, **settings(key, resolution, threshold_a, threshold_b, free_resolution))


def pixel_perfect_resolution(picture: Image.Image, width: int, height: int, mode: str = "crop_and_resize") -> int:
    """The extension's "pixel perfect": the resolution at which the map comes out at the image's scale,
    round(k * the picture's short side), k the scale `fit` will apply."""
    w, h = picture.size
    k = (min if mode == "resize_and_fill" else max)(height / h, width / w)
    return int(round(k * min(h, w)))


# --- the extension's high_quality_resize (detectmap_proc), with OpenCV's resize kernels in numpy -----------------

def _cv_scale(n_src: int, n_dst: int) -> tuple[float, float]:
    inv = n_dst / n_src  # OpenCV's inv_scale and scale = 1 / inv_scale (doubles)
    return 1.0 / inv, inv


def _cubic_matrix(n_src: int, n_dst: int) -> np.ndarray:
    """cv2 INTER_CUBIC weights along one axis ([n_dst, n_src]): a = -0.75, half-pixel centres, replicated border,
    coefficients in float32 (as OpenCV computes them)."""
    scale, _ = _cv_scale(n_src, n_dst)
    d = np.arange(n_dst)
    fx = ((d + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    x = (fx - sx.astype(np.float32)).astype(np.float32)
    a, one = np.float32(-0.75), np.float32(1)
    c0 = ((a * (x + one) - 5 * a) * (x + one) + 8 * a) * (x + one) - 4 * a
    c1 = ((a + 2) * x - (a + 3)) * x * x + one
    c2 = ((a + 2) * (one - x) - (a + 3)) * (one - x) * (one - x) + one
    c3 = one - c0 - c1 - c2
    w = np.zeros((n_dst, n_src), np.float64)
    for k, c in enumerate((c0, c1, c2, c3)):
        np.add.at(w, (d, np.clip(sx - 1 + k, 0, n_src - 1)), c.astype(np.float32))
    return w


def _area_matrix(n_src: int, n_dst: int) -> np.ndarray:
    """cv2 INTER_AREA weights along one shrinking axis ([n_dst, n_src]), its computeResizeAreaTab: each output pixel
    the average of the source cell it covers, partly covered source pixels weighted by the covered fraction."""
    scale, _ = _cv_scale(n_src, n_dst)
    w = np.zeros((n_dst, n_src), np.float64)
    for dx in range(n_dst):
        f1 = dx * scale
        f2 = f1 + scale
        cell = min(scale, n_src - f1)
        s2 = min(int(np.floor(f2)), n_src - 1)
        s1 = min(int(np.ceil(f1)), s2)
        if s1 - f1 > 1e-3:
            w[dx, s1 - 1] = np.float32((s1 - f1) / cell)
        w[dx, s1:s2] = np.float32(1.0 / cell)
        if f2 - s2 > 1e-3:
            w[dx, s2] = np.float32(min(min(f2 - s2, 1.0), cell) / cell)
    return w


def _area_linear_matrix(n_src: int, n_dst: int) -> np.ndarray:
    """cv2 INTER_AREA where one axis grows: OpenCV's bilinear emulation ("area mode" coefficients)."""
    scale, inv = _cv_scale(n_src, n_dst)
    w = np.zeros((n_dst, n_src), np.float64)
    for dx in range(n_dst):
        sx = int(np.floor(dx * scale))
        fx = float(np.float32((dx + 1) - (sx + 1) * inv))
        fx = 0.0 if fx <= 0 else fx - np.floor(fx)
        if sx >= n_src - 1:
            sx, fx = n_src - 1, 0.0
        fx = np.rint(fx * 2048) / 2048
        w[dx, sx] += 1 - fx
        w[dx, min(sx + 1, n_src - 1)] += fx
    return w


def _resize_separable(x: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
    # (dense weights, multiplied by BLAS: optimize=True routes einsum through tensordot)
    out = np.einsum("ij,jkc->ikc", wy, np.einsum("lk,jkc->jlc", wx, x.astype(np.float64), optimize=True),
                    optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def cv_resize(x: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """cv2.resize(x, size=(width, height), interpolation) of an [H, W, C] uint8 array, for "nearest", "area" and
    "cubic" (OpenCV's definitions and 8-bit rounding; checked against cv2: nearest and area bit-exact, cubic one
    level off at rare rounding ties)."""
    (w, h), (h0, w0) = size, x.shape[:2]
    if interpolation == "nearest":
        ys = np.minimum(np.floor(np.arange(h) * _cv_scale(h0, h)[0]).astype(np.int64), h0 - 1)
        xs = np.minimum(np.floor(np.arange(w) * _cv_scale(w0, w)[0]).astype(np.int64), w0 - 1)
        return np.ascontiguousarray(x[ys][:, xs])
    if interpolation == "cubic":
        return _resize_separable(x, _cubic_matrix(h0, h), _cubic_matrix(w0, w))
    if interpolation != "area":
        raise ValueError(f"unknown interpolation {interpolation!r}")
    if h0 < h or w0 < w:  # OpenCV only averages when neither axis grows; else its bilinear in 11-bit fixed point
        wy, wx = (np.rint(m * 2048).astype(np.int64) for m in (_area_linear_matrix(h0, h), _area_linear_matrix(w0, w)))
        rows = np.einsum("lk,jkc->jlc", wx, x.astype(np.int64))  # [h0, w, C], scaled by 2048
        # each output row reads source rows sy (weight b0) and sy + 1 (b1)
        sy = np.array([np.nonzero(r)[0][0] for r in wy])
        b0 = wy[np.arange(h), sy]
        sy1 = np.minimum(sy + 1, h0 - 1)
        b1 = np.where(sy1 > sy, wy[np.arange(h), sy1], 0)
        # its SIMD vertical pass: ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16), then (+ 2) >> 2
        v = (((rows[sy] >> 4) * b0[:, None, None]) >> 16) + (((rows[sy1] >> 4) * b1[:, None, None]) >> 16)
        return np.clip((v + 2) >> 2, 0, 255).astype(np.uint8)
    if h0 % h == 0 and w0 % w == 0:  # integer factors: OpenCV's fast box average, integer sums
        ky, kx = h0 // h, w0 // w
        s = x.astype(np.int64).reshape(h, ky, w, kx, -1).sum(axis=(1, 3))
        if ky == kx == 2:  # its SIMD 2x2 path rounds half up
            return ((s + 2) >> 2).astype(np.uint8)
        return np.clip(np.rint(s.astype(np.float32) * np.float32(1.0 / (ky * kx))), 0, 255).astype(np.uint8)
    # its resizeArea_: float32 sums, taken source pixel by source pixel (rows, then columns of rows)
    buf = _accumulate_f32(x, _area_matrix(w0, w), axis=1)
    return np.clip(np.rint(_accumulate_f32(buf, _area_matrix(h0, h), axis=0)), 0, 255).astype(np.uint8)


def _accumulate_f32(x: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """sum_k x[src_k] * w[d, src_k] along `axis`, in float32 and in ascending source order (as OpenCV adds)."""
    taps = [np.nonzero(r)[0] for r in w]
    out = None
    for k in range(max(len(t) for t in taps)):
        src = np.array([t[min(k, len(t) - 1)] for t in taps])
        wt = np.array([w[d, t[k]] if k < len(t) else 0.0 for d, t in enumerate(taps)], np.float32)
        shape = [1] * x.ndim
        shape[axis] = len(taps)
        term = np.take(x, src, axis=axis).astype(np.float32) * wt.reshape(shape)
        out = term if out is None else out + term
    return out


def _morph(x: np.ndarray, kernel: np.ndarray, op: str) -> np.ndarray:
    """cv2.erode / cv2.dilate of a uint8 array with a 3x3 kernel (anchor at the centre, OpenCV's default border: the
    outside never wins)."""
    h, w = x.shape[:2]
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2)
    p = np.pad(x, pad, constant_values=255 if op == "erode" else 0)
    pick = np.minimum if op == "erode" else np.maximum
    out = None
    for i, j in zip(*np.nonzero(kernel)):
        s = p[i: i + h, j: j + w]
        out = s.copy() if out is None else pick(out, s)
    return out


def _hit_miss(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel): erode(x, kernel == 1) & erode(~x, kernel == -1)."""
    full = np.full_like(x, 255)
    e1 = _morph(x, kernel == 1, "erode") if (kernel == 1).any() else full
    e2 = _morph(255 - x, kernel == -1, "erode") if (kernel == -1).any() else full
    return e1 & e2


def _rotations(raw: list[np.ndarray]) -> list[np.ndarray]:
    return [np.rot90(k, k=r, axes=(0, 1)) for r in range(4) for k in raw]


_THIN = _rotations([np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]]), np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]])])
_PRUNE = _rotations([np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]]),
                     np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])])
_NMS = [np.array(a, np.uint8) for a in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                        [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]


def _thin_once(x: np.ndarray, kernels: list[np.ndarray]) -> tuple[np.ndarray, bool]:
    done = True
    for k in kernels:
        hit = _hit_miss(x, k) > 127
        x[hit] = 0
        done = done and not hit.any()
    return x, done


def lvmin_thin(x: np.ndarray, prunings: bool = True) -> np.ndarray:
    """The extension's lvminthin.lvmin_thin: up to 32 rounds of hit-or-miss thinning, then one of pruning."""
    x = x.copy()
    for _ in range(32):
        x, done = _thin_once(x, _THIN)
        if done:
            break
    if prunings:
        x, _ = _thin_once(x, _PRUNE)
    return x


def nake_nms(x: np.ndarray) -> np.ndarray:
    """The extension's utils.nake_nms: keep a pixel where it is the maximum along one of four directions."""
    y = np.zeros_like(x)
    for f in _NMS:
        np.putmask(y, _morph(x, f, "dilate") == x, x)
    return y


def otsu_binary(x: np.ndarray) -> np.ndarray:
    """cv2.threshold(x, 0, 255, THRESH_BINARY + THRESH_OTSU)[1] of a uint8 array (OpenCV's Otsu level)."""
    hist = np.bincount(x.reshape(-1), minlength=256).astype(np.float64)
    scale = 1.0 / x.size
    mu = float((np.arange(256) * hist).sum()) * scale
    mu1 = q1 = max_sigma = 0.0
    level = 0
    eps = float(np.finfo(np.float32).eps)
    for i in range(256):
        p = hist[i] * scale
        mu1 *= q1
        q1 += p
        q2 = 1.0 - q1
        if min(q1, q2) < eps or max(q1, q2) > 1.0 - eps:
            continue
        mu1 = (mu1 + i * p) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
        if sigma > max_sigma:
            max_sigma, level = sigma, i
    return np.where(x > level, 255, 0).astype(np.uint8)


def high_quality_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The extension's high_quality_resize of an [H, W, 3] uint8 map to size = (width, height): nearest for maps of
    3 to 199 colours (segmentation), else area when shrinking / bicubic otherwise; a binary map (two colours, one
    below 16 and one above 240) comes back as grey 0/255 through the channel mean and Otsu's threshold, and a map of
    one-pixel lines is first thinned by non-maximum suppression and afterwards by lvmin_thin (pruned when growing)."""
    if x.shape[0] == size[1] and x.shape[1] == size[0]:
        return x
    smaller = size[0] * size[1] < x.shape[0] * x.shape[1]
    bigger = size[0] * size[1] > x.shape[0] * x.shape[1]
    n = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    one_px = binary = False
    if n == 2:
        binary = bool(np.min(x) < 16 and np.max(x) > 240)
        if binary:
            box = np.ones((3, 3), np.uint8)
            xc = _morph(_morph(x, box, "erode"), box, "dilate")
            one_px = np.count_nonzero(xc < x) * 2 > np.count_nonzero(x > 127)
    y = cv_resize(x, size, "nearest" if 2 < n < 200 else ("area" if smaller else "cubic"))
    if binary:
        y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if one_px:
            y = lvmin_thin(otsu_binary(nake_nms(y)), prunings=bigger)
        else:
            y = otsu_binary(y)
        y = np.stack([y] * 3, axis=2)
    return y


def fit(picture: Image.Image, width: int, height: int, mode: str = "just_resize") -> Image.Image:
    """The control map at the image's size, as the extension fits it ("Just Resize", "Crop and Resize": scaled by
    max(h / H, w / W) and cut at the centre, "Resize and Fill": scaled by the min and centred on the median colour of
    the map's border). Resized as the extension's `high_quality_resize`: nearest for segmentation-like maps,
    area down / bicubic up otherwise, binary maps (edges) kept binary grey 0/255 and one-pixel lines kept thin."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    x = hwc3(picture)
    h0, w0 = x.shape[:2]
    if (w0, h0) == (width, height):
        return Image.fromarray(x)
    resize = high_quality_resize

    if mode == "just_resize":
        return Image.fromarray(resize(x, (width, height)))
    k = (max if mode == "crop_and_resize" else min)(height / h0, width / w0)
    nw, nh = max(1, int(np.round(w0 * k))), max(1, int(np.round(h0 * k)))
    scaled = resize(x, (nw, nh))
    if mode == "crop_and_resize":
        top, left = max(0, (nh - height) // 2), max(0, (nw - width) // 2)
        return Image.fromarray(np.ascontiguousarray(scaled[top: top + height, left: left + width]))
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
    out = np.tile(np.median(border, axis=0).astype(np.uint8)[None, None], (height, width, 1))
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top: top + nh, left: left + nw] = scaled
    return Image.fromarray(out)
