"""The shapes judge: perfect on the generator's own images, near chance on shuffled captions, and
right on hand-drawn images (Pillow, not our generator) for the cases that must fail."""

import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imagine.data import judge as J
from imagine.data import shapes as S


@pytest.fixture(scope="module")
def generated():
    rng = random.Random(2024)
    scenes = [S.sample_scene(rng, fam, split) for fam in S.FAMILIES for split in ("train", "heldout")
              for _ in range(300)]
    return scenes, [S.render_array(s) for s in scenes]


def test_every_object_kind_and_size_reads_back_exactly():
    # positions are integers, so (shape, size, colour) fixes the rendering: check them all
    for shape in S.SHAPES:
        for size in range(10, 31):
            for color in S.COLORS:
                o = S.ShapeObject(color, shape, size, 3, 5)
                found = J.detect_objects(S.render([o]))
                assert len(found) == 1, (o, found)
                d = found[0]
                assert (d["color"], d["shape"]) == (color, shape), (o, d)
                assert size - J.SIZE_TOLERANCE <= d["size"] <= size, (o, d)
                assert abs(d["centre"][0] - o.centre[0]) <= 1 and abs(d["centre"][1] - o.centre[1]) <= 1


def test_judge_scores_one_on_generated_images_in_every_family(generated):
    scenes, images = generated
    results = [(img, s.caption, s.family, S.is_heldout(*s.objects[:2]) if s.family in ("pair", "relation") else False)
               for s, img in zip(scenes, images)]
    report = J.score(results)
    assert report["counts"]["n"] == 3000
    for fam in S.FAMILIES:
        assert report["families"][fam]["score"] == 1.0, fam
    assert report["overall"] == 1.0 and report["seen"]["score"] == 1.0 and report["heldout"]["score"] == 1.0
    assert report["heldout"]["families"]["pair"]["n"] == 300


def test_shuffled_captions_score_near_chance(generated):
    scenes, images = generated
    caps = [s.caption for s in scenes]
    random.Random(0).shuffle(caps)
    rate = np.mean([J.judge(img, c) for img, c in zip(images, caps)])
    print(f"judge pass rate with captions permuted among 3000 images: {rate:.4f}")
    assert rate < 0.1


def test_wrong_content_fails_each_family(generated):
    scenes, images = generated
    rng = random.Random(1)
    for s, img in list(zip(scenes, images))[::10]:
        p = J.parse_caption(s.caption)
        o = p["objects"][0]
        if p["family"] == "count":
            wrong = s.caption.replace("two", "@").replace("three", "two").replace("@", "three")
        elif p["family"] == "sized":
            wrong = s.caption.replace("small", "@").replace("large", "small").replace("@", "large")
        elif p["family"] == "relation":
            flip = {"to the left of": "to the right of", "to the right of": "to the left of",
                    "above": "below", "below": "above"}
            wrong = s.caption.replace(p["relation"], flip[p["relation"]])
        else:  # single, pair: recolour the first object to a colour absent from the image
            absent = [c for c in S.COLORS if c not in {x.color for x in s.objects}]
            wrong = S.canonical_caption(p["family"], [(rng.choice(absent), o["shape"])] +
                                        [(x["color"], x["shape"]) for x in p["objects"][1:]])
        assert not J.judge(img, wrong), (s.caption, wrong)


def _canvas():
    return Image.new("RGB", (64, 64), "white")


def test_hand_drawn_images():
    red, blue = S.COLORS["red"], S.COLORS["blue"]
    img = _canvas()
    d = ImageDraw.Draw(img)
    d.ellipse((4, 21, 21, 38), fill=red)  # a red circle, 18 px, centre (13, 30)
    d.rectangle((40, 22, 55, 37), fill=blue)  # a blue square, 16 px, centre (48, 30)
    assert J.judge(img, "a red circle")
    assert J.judge(img, "a blue square")
    assert J.judge(img, "a red circle and a blue square")
    assert J.judge(img, "a red circle to the left of a blue square")
    assert J.judge(img, "a blue square to the right of a red circle")
    assert not J.judge(img, "a red circle to the right of a blue square")  # wrong relation
    assert not J.judge(img, "a red circle above a blue square")  # horizontal gap exceeds vertical
    assert not J.judge(img, "a green circle")  # wrong colour
    assert not J.judge(img, "a red square")  # wrong shape
    assert not J.judge(img, "two red circles")
    assert not J.judge(img, "a large red circle") and not J.judge(img, "a small red circle")  # 18 px: neither
    assert J.judge(img, "a small blue square")  # 16 px: small within the 2 px tolerance
    d.ellipse((4, 19, 23, 38), fill=red)  # grow the circle to 20 px: large within the tolerance
    assert J.judge(img, "a large red circle")
    assert not J.judge(_canvas(), "a red circle")  # blank
    assert J.detect_objects(_canvas()) == []


def test_hand_drawn_triangles_count_and_noise():
    img = _canvas()
    d = ImageDraw.Draw(img)
    for x in (2, 24, 46):
        d.polygon([(x, 40), (x + 15, 40), (x + 7.5, 25)], fill=S.COLORS["green"])
    assert J.judge(img, "three green triangles")
    assert not J.judge(img, "two green triangles")
    d.rectangle((30, 5, 33, 8), fill=S.COLORS["green"])  # 16 px speck: below the 20 px minimum area
    assert J.judge(img, "three green triangles")
    # off-palette colours are background: a grey or pale disc is no object
    img = _canvas()
    ImageDraw.Draw(img).ellipse((10, 10, 40, 40), fill=(128, 128, 128))
    assert J.detect_objects(img) == []
    # a long bar has no shape (aspect ratio outside 0.75..1.33)
    img = _canvas()
    ImageDraw.Draw(img).rectangle((10, 10, 50, 20), fill=S.COLORS["purple"])
    (obj,) = J.detect_objects(img)
    assert obj["color"] == "purple" and obj["shape"] is None


def test_colour_rule_thresholds():
    a = np.full((64, 64, 3), 255, np.uint8)
    a[10:20, 10:20] = (255, 40, 40)  # 35 from red
    a[10:20, 30:40] = (220, 40, 40 + 79)  # 79 from red (purple is 109 away, white 280): red
    a[30:40, 10:20] = (220, 40, 40 + 81)  # 81 from red, 107 from purple: background
    labels = J.classify_pixels(a)
    red = list(S.COLORS).index("red")
    assert (labels[10:20, 10:20] == red).all() and (labels[10:20, 30:40] == red).all()
    assert (labels[30:40, 10:20] == -1).all()
    assert (labels[50:, 50:] == -1).all()


def test_non_64_images_are_resized():
    big = S.render(S.sample_scene(random.Random(3), "pair")).resize((256, 256), Image.NEAREST)
    small = S.sample_scene(random.Random(3), "pair")
    assert J.judge(big, small.caption)


@pytest.mark.parametrize("caption, problem", [
    ("a orange circle", "use 'an'"),
    ("an red circle", "use 'a'"),
    ("a red circle.", "final period"),
    ("A red circle", "lower case"),
    ("a pink circle", "unknown colour"),
    ("a red hexagon", "unknown shape"),
    ("a red circle and a red circle", "differ"),
    ("a red circle next to a blue square", "expected 'and' or a relation"),
    ("four red circles", "expected 'a' or 'an'"),
    ("two red circle", "plural"),
    ("a large red circle and a blue square", "size word"),
    ("a red  circle", "single spaces"),
    ("", "empty"),
])
def test_parse_caption_rejects_non_canonical(caption, problem):
    with pytest.raises(ValueError, match=problem):
        J.parse_caption(caption)
    with pytest.raises(ValueError):
        J.judge(_canvas(), caption)


def test_parse_caption_reads_every_canonical_caption():
    for c in S.all_captions("any", variants=False):
        p = J.parse_caption(c)
        kinds = [(o["color"], o["shape"]) for o in p["objects"]] * p.get("count", 1)
        assert S.canonical_caption(p["family"], kinds, p.get("size"), p.get("relation")) == c
    assert J.parse_caption("three orange triangles") == dict(family="count", count=3,
                                                             objects=[dict(color="orange", shape="triangle")])
    assert J.parse_caption("a small orange circle") == dict(family="sized", size="small",
                                                            objects=[dict(color="orange", shape="circle")])
    with pytest.raises(TypeError):
        J.judge("not an image", "a red circle")


def test_classify_pixels_matches_the_rule_written_out():
    rng = np.random.default_rng(0)
    names = list(S.COLORS)
    for _ in range(3):
        a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        a[:32] = 255 - a[:32] // 3  # plenty of pale pixels near the white/colour boundary
        labels = J.classify_pixels(a)
        for y, x in zip(rng.integers(0, 64, 300), rng.integers(0, 64, 300)):
            px = a[y, x].astype(float)
            dist = {n: np.linalg.norm(px - np.array(S.COLORS[n])) for n in names}
            best = min(names, key=dist.get)
            want = names.index(best) if dist[best] < 80 and dist[best] < np.linalg.norm(px - 255) else -1
            assert labels[y, x] == want, (px, dist)


def test_diagnose_names_each_kind_of_miss(generated):
    """Captions altered in one known way against the generator's own images: diagnose must name
    exactly that alteration (and None for the true caption)."""
    scenes, images = generated
    flip = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}
    across = {"to the left of": "above", "to the right of": "below", "above": "to the left of",
              "below": "to the right of"}
    seen = set()
    for s, img in list(zip(scenes, images))[::7]:
        objects = J.detect_objects(img)
        assert J.diagnose(objects, s.caption) is None
        p = J.parse_caption(s.caption)
        kinds = [(o["color"], o["shape"]) for o in p["objects"]]
        cases = []
        if p["family"] == "relation":
            cases += [(s.caption.replace(p["relation"], flip[p["relation"]]), "reversed"),
                      (s.caption.replace(p["relation"], across[p["relation"]]), "misplaced")]
        if p["family"] in ("pair", "relation") and kinds[0][0] != kinds[1][0] and kinds[0][1] != kinds[1][1]:
            swapped = [(kinds[0][0], kinds[1][1]), (kinds[1][0], kinds[0][1])]
            cases.append((S.canonical_caption(p["family"], swapped, relation=p.get("relation")), "shapes swapped"))
        if p["family"] == "count":
            other = "three" if p["count"] == 2 else "two"
            cases.append((s.caption.replace(s.caption.split(" ")[0], other, 1),
                          "too few" if p["count"] == 2 else "too many"))
        if p["family"] == "sized":
            cases.append((s.caption.replace(p["size"], {"small": "large", "large": "small"}[p["size"]]), "wrong size"))
        if p["family"] == "single":
            other_shape = next(x for x in S.SHAPES if x != kinds[0][1])
            absent = next(c for c in S.COLORS if c != kinds[0][0])
            cases += [(S.canonical_caption("single", [(kinds[0][0], other_shape)]), "wrong shape"),
                      (S.canonical_caption("single", [(absent, kinds[0][1])]), "absent")]
        for caption, why in cases:
            assert J.diagnose(objects, caption) == why, (s.caption, caption)
            seen.add(why)
    assert seen == set(J.FAILURES) - {"misshapen"}


def test_diagnose_on_hand_drawn_blobs():
    img = _canvas()
    d = ImageDraw.Draw(img)
    d.rectangle((4, 20, 40, 30), fill=S.COLORS["red"])  # 37 x 11 px: no shape (aspect ratio)
    objects = J.detect_objects(img)
    assert [o["shape"] for o in objects] == [None]
    assert J.diagnose(objects, "a red circle") == "misshapen"
    assert J.diagnose(objects, "two red squares") == "misshapen"
    assert J.diagnose(objects, "a red circle and a blue square") == "absent"  # the worse of the two
    assert J.diagnose([], "a green triangle below a red square") == "absent"
