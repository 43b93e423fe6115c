"""The shapes judge: does an image hold what its canonical caption says (shared/specs/shapes.md)?

- A pixel belongs to the palette colour nearest to it in RGB if that distance is under 80 and
  smaller than its distance to white; otherwise it is background.
- Objects are 4-connected components of one colour with an area of at least 20 px.
- Shape from the fill ratio (area / bounding-box area) when the box's aspect ratio w / h is
  within 0.75 to 1.33: square above 0.88, circle 0.66 to 0.88, triangle below 0.66; outside that
  aspect ratio the object has no shape.
- An object's size is the longer side of its bounding box, its centre the box's centre (the
  generator's convention: size and position are those of the box).
- Verdicts per family: single - one object of the colour and shape; sized - such an object whose
  size is in the size range widened by 2 px each way; pair - both objects present; relation -
  an instance of each whose centres satisfy the relation; count - exactly that many objects of
  the colour and shape.

Images that are not 64x64 are box-resized to 64x64 first, since sizes are in pixels of the
64x64 canvas.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from imagine.data.shapes import (CANVAS, COLORS, COUNT_WORDS, FAMILIES, RELATIONS, SHAPES, SIZE_RANGES,
                                 canonical_caption, is_heldout, relation_holds)

COLOR_DISTANCE = 80.0
MIN_AREA = 20
ASPECT_RANGE = (0.75, 1.33)
SQUARE_ABOVE = 0.88
TRIANGLE_BELOW = 0.66
SIZE_TOLERANCE = 2

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], np.int32)  # [6, 3]
_REFS = np.vstack([_PALETTE, [255, 255, 255]]).astype(np.float64)  # [7, 3]: palette, then white
_REFS_SQ = (_REFS ** 2).sum(1)
_FORMS = ('"a {color} {shape}", "a {small|large} {color} {shape}", "a {c1} {s1} and a {c2} {s2}", '
          '"a {c1} {s1} {to the left of|to the right of|above|below} a {c2} {s2}", "{two|three} {color} {shape}s"')


# ----------------------------------------------------------------------------------- captions

def _bad(caption: str, why: str) -> ValueError:
    return ValueError(f"{caption!r} is not a canonical shapes caption: {why}. Canonical forms: {_FORMS} "
                      f"(colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; 'an' before a vowel)")


def _parse_object(caption: str, words: list[str], i: int, allow_size: bool):
    """Parse "a|an [size] colour shape" at words[i]; return (object dict, size word, next index)."""
    if i >= len(words) or words[i] not in ("a", "an"):
        got = words[i] if i < len(words) else "the end of the caption"
        raise _bad(caption, f"expected 'a' or 'an' at word {i + 1}, got {got!r}")
    art, j, size = words[i], i + 1, None
    if allow_size and j < len(words) and words[j] in ("small", "large"):
        size, j = words[j], j + 1
    if j >= len(words):
        raise _bad(caption, "an object phrase ends early")
    if words[j] in ("small", "large"):
        raise _bad(caption, f"a size word ({words[j]!r}) is only allowed in a one-object caption")
    if words[j] not in COLORS:
        raise _bad(caption, f"unknown colour {words[j]!r}")
    if j + 1 >= len(words):
        raise _bad(caption, f"the colour {words[j]!r} has no shape after it")
    if words[j + 1] not in SHAPES:
        raise _bad(caption, f"unknown shape {words[j + 1]!r}")
    want = "an" if words[i + 1][0] in "aeiou" else "a"
    if art != want:
        raise _bad(caption, f"use {want!r} before {words[i + 1]!r}")
    return {"color": words[j], "shape": words[j + 1]}, size, j + 2


@lru_cache(maxsize=4096)
def _parse(caption: str) -> dict:
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str; got {type(caption).__name__}")
    if not caption:
        raise _bad(caption, "it is empty")
    if caption != caption.lower():
        raise _bad(caption, "it must be lower case")
    if caption.rstrip().endswith("."):
        raise _bad(caption, "it must have no final period")
    words = caption.split(" ")
    if "" in words:
        raise _bad(caption, "words must be separated by single spaces, with no leading or trailing space")
    if words[0] in COUNT_WORDS:
        if len(words) != 3:
            raise _bad(caption, "a count caption has three words, e.g. 'two red circles'")
        color, plural = words[1], words[2]
        if color not in COLORS:
            raise _bad(caption, f"unknown colour {color!r}")
        if not plural.endswith("s") or plural[:-1] not in SHAPES:
            raise _bad(caption, f"expected a plural shape (circles, squares, triangles), got {plural!r}")
        parsed = dict(family="count", objects=[{"color": color, "shape": plural[:-1]}], count=COUNT_WORDS[words[0]])
    else:
        obj1, size, i = _parse_object(caption, words, 0, allow_size=True)
        if i == len(words):
            parsed = dict(family="sized" if size else "single", objects=[obj1])
            if size:
                parsed["size"] = size
        else:
            if size:
                raise _bad(caption, "a size word is only allowed in a one-object caption")
            rest = " ".join(words[i:])
            if rest.startswith("and "):
                family, relation, i = "pair", None, i + 1
            else:
                relation = next((r for r in RELATIONS if rest.startswith(r + " ")), None)
                if relation is None:
                    raise _bad(caption, f"expected 'and' or a relation ({', '.join(RELATIONS)}) after "
                                        f"{' '.join(words[:i])!r}, got {rest!r}")
                family, i = "relation", i + len(relation.split(" "))
            obj2, _, i = _parse_object(caption, words, i, allow_size=False)
            if i != len(words):
                raise _bad(caption, f"unexpected words after the second object: {' '.join(words[i:])!r}")
            if obj1 == obj2:
                raise _bad(caption, "the two objects must differ in colour or in shape")
            parsed = dict(family=family, objects=[obj1, obj2])
            if relation:
                parsed["relation"] = relation
    # belt and braces: the parse must round-trip to the generator's canonical form
    kinds = [(o["color"], o["shape"]) for o in parsed["objects"]] * parsed.get("count", 1)
    canon = canonical_caption(parsed["family"], kinds, parsed.get("size"), parsed.get("relation"))
    if canon != caption:
        raise _bad(caption, f"its canonical form is {canon!r}")
    return parsed


def parse_caption(caption: str) -> dict:
    """Parse a canonical caption into dict(family, objects=[{color, shape}, ...], and, by family,
    size ("small"/"large"), relation, count). ValueError naming the problem otherwise."""
    # a copy: the cached parse must not be mutated by callers
    return {k: [dict(o) for o in v] if k == "objects" else v for k, v in _parse(caption).items()}


# ----------------------------------------------------------------------------------- detection

def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
        if img.size != (CANVAS, CANVAS):
            img = img.resize((CANVAS, CANVAS), Image.BOX)
        return np.asarray(img, dtype=np.uint8)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image array must be [H, W, 3] uint8; got {image.shape} {image.dtype}")
        if image.shape[:2] != (CANVAS, CANVAS):
            return _as_array(Image.fromarray(image, "RGB"))
        return image
    raise TypeError(f"image must be a PIL.Image or an [H, W, 3] uint8 numpy array; got {type(image).__name__}")


def classify_pixels(image) -> np.ndarray:
    """[H, W] int: index into COLORS (in its order) of each pixel's colour, -1 for background."""
    a = _as_array(image)
    h, w, _ = a.shape
    x = a.reshape(-1, 3).astype(np.float64)
    # squared distances |x - p|^2 = |x|^2 - 2 x.p + |p|^2 to the palette and to white (column 6);
    # every term is an integer below 2^53, so this is exact
    d2 = (x * x).sum(1, keepdims=True) - 2.0 * x @ _REFS.T + _REFS_SQ  # [H*W, 7]
    nearest = d2[:, :6].argmin(1)
    dmin = d2[np.arange(len(x)), nearest]
    ok = (dmin < COLOR_DISTANCE ** 2) & (dmin < d2[:, 6])
    return np.where(ok, nearest, -1).reshape(h, w)


def shape_of(area: int, w: int, h: int) -> str | None:
    aspect = w / h
    if not ASPECT_RANGE[0] <= aspect <= ASPECT_RANGE[1]:
        return None
    fill = area / (w * h)
    if fill > SQUARE_ABOVE:
        return "square"
    if fill >= TRIANGLE_BELOW:
        return "circle"
    return "triangle"


def detect_objects(image) -> list[dict]:
    """The objects in an image: dict(color, shape (None if the aspect ratio is off), bbox
    (x0, y0, x1, y1) with x1, y1 exclusive, centre (of the box), area, size (longer box side))."""
    labels = classify_pixels(image)
    found = []
    for k, name in enumerate(_NAMES):
        mask = labels == k
        if not mask.any():
            continue
        comp, n = ndimage.label(mask)  # default structure: 4-connectivity in 2-D
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
            area = int(areas[idx])
            if area < MIN_AREA:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            w, h = x1 - x0, y1 - y0
            found.append(dict(color=name, shape=shape_of(area, w, h), bbox=(x0, y0, x1, y1),
                              centre=((x0 + x1) / 2, (y0 + y1) / 2), area=area, size=max(w, h)))
    return found


# ----------------------------------------------------------------------------------- verdicts

def judge_objects(objects: list[dict], caption: str) -> bool:
    """The verdict for already detected objects (see detect_objects)."""
    p = parse_caption(caption)

    def matching(o):
        return [d for d in objects if d["color"] == o["color"] and d["shape"] == o["shape"]]

    first = matching(p["objects"][0])
    family = p["family"]
    if family == "single":
        return bool(first)
    if family == "sized":
        lo, hi = SIZE_RANGES[p["size"]]
        return any(lo - SIZE_TOLERANCE <= d["size"] <= hi + SIZE_TOLERANCE for d in first)
    if family == "count":
        return len(first) == p["count"]
    second = matching(p["objects"][1])
    if family == "pair":
        return bool(first) and bool(second)
    return any(relation_holds(a["centre"], b["centre"], p["relation"]) for a in first for b in second)


# Why a verdict failed, one label per image: what the eval report counts per family so that "what
# limits the model" is a measurement, not a reading of sample grids. Checked in this order:
FAILURES = (
    "shapes swapped",   # pair/relation: each colour is there, carrying the other object's shape
    "reversed",         # relation: both objects drawn, and the opposite relation holds
    "misplaced",        # relation: both drawn, neither the relation nor its opposite (other axis, too close)
    "too few",          # count: fewer objects of the colour and shape than asked
    "too many",         # count: more
    "wrong size",       # sized: the object is drawn, its size outside the range
    "misshapen",        # a named colour is there only as shapeless blobs (merged or malformed objects)
    "wrong shape",      # a named colour is there, as another shape
    "absent",           # a named colour is not in the image at all
)


def diagnose(objects: list[dict], caption: str) -> str | None:
    """None if the detected `objects` satisfy `caption` (judge_objects), else the first label of
    FAILURES that describes the miss."""
    if judge_objects(objects, caption):
        return None
    p = parse_caption(caption)
    named = p["objects"]

    def has(color, shape):
        return [d for d in objects if d["color"] == color and d["shape"] == shape]

    drawn = [bool(has(o["color"], o["shape"])) for o in named]
    if len(named) == 2:
        a, b = named
        if (a["shape"] != b["shape"] and a["color"] != b["color"] and not any(drawn)
                and has(a["color"], b["shape"]) and has(b["color"], a["shape"])):
            return "shapes swapped"
        if p["family"] == "relation" and all(drawn):
            first, second = has(a["color"], a["shape"]), has(b["color"], b["shape"])
            if any(relation_holds(y["centre"], x["centre"], p["relation"]) for x in first for y in second):
                return "reversed"
            return "misplaced"
    if p["family"] == "count" and drawn[0]:
        return "too few" if len(has(named[0]["color"], named[0]["shape"])) < p["count"] else "too many"
    if p["family"] == "sized" and drawn[0]:
        return "wrong size"

    def status(o):
        shapes = {d["shape"] for d in objects if d["color"] == o["color"]}
        if not shapes:
            return "absent"
        return "misshapen" if shapes == {None} else "wrong shape"

    # the worst-off named object decides (absent is worse than wrong shape, worse than misshapen)
    return max((status(o) for o, ok in zip(named, drawn) if not ok), key=FAILURES.index)


def judge(image, caption: str) -> bool:
    """Whether the image holds what the canonical caption says."""
    parse_caption(caption)  # a bad caption is an error even for a blank image
    return judge_objects(detect_objects(image), caption)


def score(results) -> dict:
    """Score generations: `results` is a sequence of (image, caption, family, heldout); an image
    may also be given as an already computed bool verdict.

    Returns dict(
      overall: mean of the family scores (all prompts),
      families: {family: {score, correct, n}},
      seen / heldout: {score, correct, n, families: {...}} - heldout holds the held-out pair and relation
        prompts, seen all the others (its families listed, single, sized and count among them); each score is the
        mean of the family scores over the families held-out prompts have (pair, relation), like for like,
      heldout_gap: mean over pair and relation of seen minus held-out score (where both exist),
      counts: {n, correct}).
    """
    tallies: dict[str, dict[str, list[int]]] = {"all": {}, "seen": {}, "heldout": {}}
    for item in results:
        if len(item) != 4:
            raise ValueError("each result must be (image, caption, family, heldout)")
        image, caption, family, heldout = item
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
        ok = bool(image) if isinstance(image, (bool, np.bool_)) else judge(image, caption)
        for part in ("all", "heldout" if heldout else "seen"):
            t = tallies[part].setdefault(family, [0, 0])
            t[0] += int(ok)
            t[1] += 1

    def block(t):
        fams = {f: dict(score=c / n, correct=c, n=n) for f, (c, n) in sorted(t.items(), key=lambda kv: FAMILIES.index(kv[0]))}
        mean = float(np.mean([v["score"] for v in fams.values()])) if fams else float("nan")
        return dict(score=mean, correct=sum(v["correct"] for v in fams.values()),
                    n=sum(v["n"] for v in fams.values()), families=fams)

    everything = block(tallies["all"])
    seen, held = block(tallies["seen"]), block(tallies["heldout"])
    # (the seen score over the families that have held-out prompts, pair and relation, as the held-out score is:
    # like for like; a seen family of its own, count, would otherwise move it)
    seen["score"] = block({f: t for f, t in tallies["seen"].items() if f in tallies["heldout"]})["score"]
    gaps = [seen["families"][f]["score"] - held["families"][f]["score"]
            for f in ("pair", "relation") if f in seen["families"] and f in held["families"]]
    return dict(overall=everything["score"], families=everything["families"], seen=seen, heldout=held,
                heldout_gap=float(np.mean(gaps)) if gaps else float("nan"),
                counts=dict(n=everything["n"], correct=everything["correct"]))


__all__ = ["parse_caption", "detect_objects", "judge", "judge_objects", "diagnose", "FAILURES", "score",
           "classify_pixels", "shape_of",
           "is_heldout"]
