"""The shapes generator against the contract in shared/specs/shapes.md."""

import hashlib
import random
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from imagine.data import shapes as S

SPEC_COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 205, 30),
               "green": (40, 170, 70), "blue": (40, 90, 220), "purple": (140, 60, 190)}


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(1234)
    return [S.sample_scene(rng, fam, split) for split in ("train", "heldout") for fam in S.FAMILIES
            for _ in range(200)]


def test_palette_and_names_follow_the_spec():
    assert S.COLORS == SPEC_COLORS
    assert S.SHAPES == ("circle", "square", "triangle")
    assert S.FAMILIES == ("single", "sized", "pair", "relation", "count")
    assert S.RELATIONS == ("to the left of", "to the right of", "above", "below")


def test_render_is_64x64_rgb_white_background(scenes):
    img = S.render(scenes[0])
    assert img.size == (64, 64) and img.mode == "RGB"
    a = np.asarray(img)
    for s in scenes[:200]:
        a = S.render_array(s)
        ink = np.zeros((64, 64), bool)
        for o in s.objects:
            ink[o.y:o.y + o.size, o.x:o.x + o.size] = True
        assert (a[~ink] == 255).all()  # outside every box: pure white


def test_exact_fill_colour_at_each_objects_centre(scenes):
    for s in scenes:
        a = S.render_array(s)
        for o in s.objects:
            assert tuple(a[o.y + o.size // 2, o.x + o.size // 2]) == SPEC_COLORS[o.color], (s.caption, o)


def test_antialiased_edges():
    # a circle's rim has pixels strictly between the fill and white (the 4x supersampling)
    a = S.render_array([S.ShapeObject("blue", "circle", 20, 10, 10)]).astype(int)
    fill, white = np.array(SPEC_COLORS["blue"]), np.array([255, 255, 255])
    is_pure = (a == fill).all(-1) | (a == white).all(-1)
    assert (~is_pure).sum() > 20
    # and the square, on integer pixels, has none
    a = S.render_array([S.ShapeObject("blue", "square", 20, 10, 10)]).astype(int)
    assert ((a == np.array(SPEC_COLORS["blue"])).all(-1).sum()) == 400


def test_shape_geometry_from_coverage():
    # independent truth: areas of the ideal shapes (the 4x4 sampling estimates them within a few %)
    for size in (10, 17, 30):
        assert S.coverage("square", size).sum() == size * size
        assert S.coverage("circle", size).sum() == pytest.approx(np.pi * size ** 2 / 4, rel=0.03)
        tri = S.coverage("triangle", size)
        assert tri.sum() == pytest.approx(size ** 2 / 2, rel=0.03)
        assert tri[-1].sum() > size - 1.5 and tri[0].sum() < 1  # base at the bottom, apex at the top
        assert np.allclose(tri, tri[:, ::-1])  # isosceles


def test_objects_inside_separated_by_two_px_and_sizes_in_range(scenes):
    for s in scenes:
        masks = []
        for o in s.objects:
            assert 0 <= o.x and 0 <= o.y and o.x + o.size <= 64 and o.y + o.size <= 64
            lo, hi = (10, 30)
            if s.family == "sized":
                lo, hi = (10, 15) if " small " in f" {s.caption} " else (22, 30)
            assert lo <= o.size <= hi, (s.caption, o)
            masks.append((S.render_array([o]) != 255).any(-1))
        for i in range(len(masks)):
            # at least 2 px of background between any two objects: grow one by 2 px (8-connected)
            grown = ndimage.binary_dilation(masks[i], np.ones((5, 5), bool))
            for j in range(len(masks)):
                if i != j:
                    assert not (grown & masks[j]).any(), s


def test_no_distractors_and_count_family_counts(scenes):
    for s in scenes:
        n = {"single": 1, "sized": 1, "pair": 2, "relation": 2}.get(s.family)
        if s.family == "count":
            word = s.caption.split()[0]
            n = {"two": 2, "three": 3}[word]
            assert len({o.kind for o in s.objects}) == 1
            color, shape = s.caption.split()[1], s.caption.split()[2][:-1]
            assert s.objects[0].kind == (color, shape)
        assert len(s.objects) == n, s


def test_pair_objects_differ_and_relations_hold(scenes):
    for s in scenes:
        if s.family in ("pair", "relation"):
            assert s.objects[0].kind != s.objects[1].kind
        if s.family == "relation":
            rel = next(r for r in S.RELATIONS if f" {r} " in s.caption)
            (x1, y1), (x2, y2) = s.objects[0].centre, s.objects[1].centre
            dx, dy = x2 - x1, y2 - y1  # the spec's rule, written out independently
            along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                             "above": (dy, dx), "below": (-dy, dx)}[rel]
            assert along >= 4 and along > abs(across), s


def test_caption_grammar():
    caps = S.all_captions("any")
    assert len(caps) == len(set(caps))
    for c in caps:
        assert c == c.lower() and not c.endswith(".") and c == c.strip() and "  " not in c
        assert not re.search(r"\ba [aeiou]", c), c
        assert not re.search(r"\ban [^aeiou]", c), c
    assert "an orange circle" in caps
    assert "a large orange square" in caps and "a small orange triangle" in caps
    assert "a red circle to the left of an orange square" in caps
    assert "two green triangles" in caps and "three orange circles" in caps
    canon = S.all_captions("any", variants=False)
    # every canonical caption of the spec's table: 18 single, 36 sized, 306 pair, 4 x 306 relation, 36 count
    assert len(canon) == 18 + 36 + 306 + 4 * 306 + 36


def test_scene_captions_canonical_first():
    rng = random.Random(0)
    for fam in S.FAMILIES:
        s = S.sample_scene(rng, fam)
        assert s.caption == s.captions[0] and s.family == fam
        assert len(set(s.captions)) == len(s.captions)


def test_heldout_split_is_ten_percent_seeded_and_stable():
    combos = [(a, b) for a in S.OBJECTS for b in S.OBJECTS if a != b]
    assert len(S.OBJECTS) == 18 and len(combos) == 306
    assert len(S.HELDOUT_COMBINATIONS) == round(0.1 * 306) == 31
    assert S.HELDOUT_COMBINATIONS <= set(combos)
    again = frozenset(random.Random(S.HELDOUT_SEED).sample(tuple(combos), 31))
    assert again == S.HELDOUT_COMBINATIONS
    # stable across versions: a change of the split would silently change what "held-out" means
    digest = hashlib.sha256(repr(sorted(S.HELDOUT_COMBINATIONS)).encode()).hexdigest()[:16]
    assert digest == HELDOUT_DIGEST, digest
    a, b = next(iter(sorted(S.HELDOUT_COMBINATIONS)))
    assert S.is_heldout(a, b)
    with pytest.raises(ValueError, match="not an object"):
        S.is_heldout(("pink", "circle"), ("red", "square"))


HELDOUT_DIGEST = "38a60744be3b88be"


def test_train_never_yields_heldout_and_heldout_only_heldout():
    rng = np.random.default_rng(5)  # numpy generators are accepted too
    for _ in range(1500):
        s = S.sample_scene(rng, None, "train")
        if s.family in ("pair", "relation"):
            assert not S.is_heldout(s.objects[0], s.objects[1])
        h = S.sample_scene(rng, random.choice(["pair", "relation"]), "heldout")
        assert S.is_heldout(h.objects[0], h.objects[1])
    # every training caption (variants included) that names two objects names a seen combination
    word = re.compile(r"\b(red|orange|yellow|green|blue|purple) (circle|square|triangle)\b")
    two = [word.findall(c) for c in S.all_captions("train")]
    two = [tuple(m) for m in two if len(m) == 2]
    assert len(two) > 1000 and not any(m in S.HELDOUT_COMBINATIONS for m in two)
    held = set(S.all_captions("heldout", variants=False))
    assert sum(" and " in c for c in held) == 31


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown family"):
        S.sample_scene(random.Random(0), "triple")
    with pytest.raises(ValueError, match="unknown split"):
        S.sample_scene(random.Random(0), "pair", "test")
    with pytest.raises(TypeError, match="rng must be"):
        S.sample_scene(0)
    with pytest.raises(ValueError, match="length"):
        S.ShapesDataset(0)


def test_dataset_is_deterministic_and_in_range():
    ds = S.ShapesDataset(1000, seed=7)
    a, b = ds[17], S.ShapesDataset(1000, seed=7)[17]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["family"] == b["family"]
    assert a["image"].shape == (3, 64, 64) and a["image"].dtype == torch.float32
    assert a["image"].min() >= -1 and a["image"].max() <= 1 and a["image"].max() == 1  # white is +1
    assert not torch.equal(ds[18]["image"], a["image"])
    assert not torch.equal(S.ShapesDataset(1000, seed=8)[17]["image"], a["image"])
    fams = {ds[i]["family"] for i in range(100)}
    assert fams == set(S.FAMILIES)
    only = S.ShapesDataset(50, seed=1, families=["count"])
    assert {only[i]["family"] for i in range(50)} == {"count"}
    weighted = S.ShapesDataset(200, seed=1, family_weights={"single": 1.0, "pair": 0.0, "relation": 0.0,
                                                             "sized": 0.0, "count": 0.0})
    assert {weighted[i]["family"] for i in range(50)} == {"single"}
    # captions come from the scene's own list, canonical among them about half the time or more
    caps = [ds.scene(i) for i in range(300)]
    assert all(c in s.captions for s, c in caps)
    assert 0.45 < np.mean([c == s.caption for s, c in caps]) < 0.9


def test_eval_prompts_cover_every_family_seen_and_heldout():
    ps = S.eval_prompts(100, seed=0)
    assert ps == S.eval_prompts(100, seed=0)
    by = {}
    for p in ps:
        by.setdefault((p["family"], p["heldout"]), []).append(p["caption"])
    for fam in ("single", "sized", "count"):
        assert len(by[(fam, False)]) == 100 and (fam, True) not in by
    for fam in ("pair", "relation"):
        assert len(by[(fam, False)]) == 100 and len(by[(fam, True)]) == 100
    assert len(set(by[("single", False)])) == 18  # cycling covers every caption
    assert len(set(by[("pair", True)])) == 31
    canon = set(S.all_captions("any", variants=False))
    assert all(p["caption"] in canon for p in ps)
