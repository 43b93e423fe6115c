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
    """The picture scaled so that its short side is `resolution` (bicubic up, area down, as the extension's
    cv2 INTER_CUBIC / INTER_AREA), then padded with its edge to a multiple of 64 at the bottom and right."""
    h, w = x.shape[:2]
    k = resolution / min(h, w)
    size = _scaled_size(h, w, resolution)
    if size != (w, h):
        x = np.asarray(Image.fromarray(x).resize(size, Image.BICUBIC if k > 1 else Image.BOX))
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


def fit(picture: Image.Image, width: int, height: int, mode: str = "just_resize") -> Image.Image:
    """The control map at the image's size, as the extension fits it ("Just Resize", "Crop and Resize": scaled by
    max(h / H, w / W) and cut at the centre, "Resize and Fill": scaled by the min and centred on the median colour of
    the map's border). Resized with Lanczos; a two-colour map (edges) is thresholded back to its two colours."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    x = hwc3(picture)
    h0, w0 = x.shape[:2]
    if (w0, h0) == (width, height):
        return Image.fromarray(x)
    colours = np.unique(x.reshape(-1, 3), axis=0)
    binary = len(colours) == 2 and colours.min() < 16 and colours.max() > 240

    def resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if (a.shape[1], a.shape[0]) == size:
            return a
        out = np.asarray(Image.fromarray(a).resize(size, Image.LANCZOS))
        return np.where(out > 127, colours.max(axis=0), colours.min(axis=0)).astype(np.uint8) if binary else out

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
