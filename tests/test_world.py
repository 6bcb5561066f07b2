"""The synthetic world the tiny models learn: determinism, captions, the colour table, the judge."""
import random
import re
from pathlib import Path

import numpy as np
import pytest

from kolors_course.world import judge as J
from kolors_course.world import scenes as W

PACKAGE = Path(W.__file__).resolve().parents[1]


def test_same_seed_same_bytes():
    a = W.sample_scenes(20, seed=3)
    b = W.sample_scenes(20, seed=3)
    assert a == b and a != W.sample_scenes(20, seed=4)
    for i, s in enumerate(a[:6]):
        assert W.render(s, seed=i).tobytes() == W.render(s, seed=i).tobytes()
        assert W.render(s, seed=i, lora_style=True).tobytes() == W.render(s, seed=i, lora_style=True).tobytes()
    ra, rb = random.Random(5), random.Random(5)
    assert [W.caption(s, ra) for s in a] == [W.caption(s, rb) for s in a]


def test_scene_rules():
    with pytest.raises(ValueError):
        W.Scene("圆形", "红色", "红色")
    with pytest.raises(ValueError):
        W.Scene("六边形", "红色", "蓝色")
    for s in W.sample_scenes(200, seed=0):
        assert s.colour != s.background


def _strip(text: str) -> str:
    """A caption with every word the world and the caption writer know removed."""
    known = sorted(set(W.vocabulary()) | set(W.OUTSIDE_WORDS) | {p for p in W.FILLER_PREFIXES if p}
                   | {p for p in W.FILLER_SUFFIXES if p}, key=len, reverse=True)
    glue = ["背景上的", "背景是", "背景为", "背景", "一个", "画面", "位于", "风格", "的作品", "画家", "效果",
            "的图形", "的东西", "居中", "的", "在"]
    for w in known + glue:
        text = text.replace(w, " ")
    return re.sub(r"[，、,。：\s]", "", text)


def test_captions_use_the_vocabulary():
    rng = random.Random(0)
    scenes = W.sample_scenes(400, seed=1)
    caps = [W.caption(s, rng) for s in scenes]
    assert all(_strip(c) == "" for c in caps), [c for c in caps if _strip(c)][:5]
    # empty captions for classifier-free guidance, about one in ten
    assert 0.05 < sum(c == "" for c in caps) / len(caps) < 0.16
    # words from outside the world appear, and the LoRA trigger word never does
    assert sum(any(w in c for w in W.OUTSIDE_WORDS) for c in caps) > 80
    assert not any("几何风" in c or W.LORA_STYLE_WORD in c for c in caps)
    # varied: many distinct phrasings, both word orders of colour and background
    assert len(set(caps)) > 300
    assert any(re.search("背景上的", c) for c in caps) and any(re.match("一个.*背景", c) for c in caps)
    # a caption never names a colour the scene does not have (no wrong supervision)
    for s, c in zip(scenes, caps):
        named = {name for name in W.COLOURS if name in c}
        assert named <= {s.colour, s.background}, (s, c)


def test_the_colour_table_is_the_single_source():
    """RGB triples of the palette live in kolors_course/world/scenes.py only (anywhere else in
    the package, a copy would drift from the table the judge and the models use)."""
    triples = {tuple(v) for v in W.COLOURS.values()}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == Path(W.__file__).resolve():
            continue
        text = path.read_text()
        for m in re.finditer(r"\((\d{1,3}),\s*(\d{1,3}),\s*(\d{1,3})\)", text):
            if tuple(int(x) for x in m.groups()) in triples:
                offenders.append(f"{path.relative_to(PACKAGE)}: {m.group(0)}")
    assert not offenders, offenders


def test_lora_style_is_not_in_the_base_data():
    s = W.Scene("圆形", "红色", "蓝色")
    plain = np.asarray(W.render(s, seed=0), np.float32)
    pastel = np.asarray(W.render(s, seed=0, lora_style=True), np.float32)
    assert pastel.mean() > plain.mean() + 40          # lighter everywhere
    assert "lora_style" not in W.dataset.__code__.co_varnames


def test_the_lora_content_check_sees_a_pastel_shape_and_not_a_washed_out_one():
    """``evaluate.keeps_content``: a pastel render (the LoRA lesson's look) still shows its shape's
    colour and background, and so does the plain render; a picture washed out to the background's
    pastel with the shape gone does not, though its pastel index is higher than the render's."""
    from kolors_course.world import evaluate as E

    ok = 0
    for i, s in enumerate(W.sample_scenes(24, seed=5)):
        pastel = W.render(s, seed=i, lora_style=True)
        ok += E.keeps_content(pastel, s.colour, s.background) and E.keeps_content(W.render(s, seed=i), s.colour,
                                                                               s.background)
        if s.painter:
            continue
        washed = np.full((128, 128, 3), W.pastel(W.COLOURS[s.background]), np.uint8)
        assert not E.keeps_content(washed, s.colour, s.background), s
        assert E.pastel_index(washed) >= E.pastel_index(W.render(s, seed=i)), s
    assert ok >= 23, ok


HAND_LABELLED = Path(__file__).parent / "data" / "judge_hand_labels"
#: the pictures the judge's shape thresholds were set on (its held-out test is HAND_LABELLED)
CALIBRATION = Path(__file__).parent / "data" / "judge_calibration"


def _agreement_with_hand_labels(folder=HAND_LABELLED) -> tuple[int, int]:
    """(pictures whose shape the judge reads as the hand label says, pictures with a hand label)."""
    import json

    from PIL import Image

    pictures = json.loads((folder / "labels.json").read_text(encoding="utf-8"))["pictures"]
    pictures = [p for p in pictures if p["hand"] is not None]
    agree = 0
    for p in pictures:
        with Image.open(folder / p["file"]) as im:
            agree += J.judge(im.convert("RGB")).shape == p["hand"]
    return agree, len(pictures)


def test_the_shape_measures_on_masks_whose_answer_is_known():
    """The convex hull's area is the rectangle's for a rectangle, and an L leaves its notch empty;
    a mask one pixel thin has no corners to cover (not NaN); an empty mask is refused."""
    rect = np.ones((10, 20), bool)
    assert J._hull_area(rect) == 200
    ell = np.ones((10, 10), bool)
    ell[:5, 5:] = False
    m = J.shape_measures(ell)
    assert abs(m["fill"] - 0.75) < 1e-9 and 0.8 < m["solidity"] < 0.9, m
    line = J.shape_measures(np.ones((1, 60), bool))
    assert line["corners"] == 0.0 and line["fill"] == 1.0, line
    with pytest.raises(ValueError, match="at least one pixel"):
        J.shape_measures(np.zeros((5, 5), bool))


def test_the_judge_reads_the_pictures_it_was_calibrated_on():
    """Not a held-out check (the thresholds were set on these pictures; the hand-labelled set
    above is the held-out one), but a floor: the 27 of 32 calibration pictures that show one of the world's shapes by eye (the other 5: a
    pentagon, lumpy blobs) are all read as labelled."""
    agree, n = _agreement_with_hand_labels(CALIBRATION)
    assert (agree, n) == (27, 27), (agree, n)


def test_the_judge_reads_generated_shapes_as_a_person_does():
    """How far the judge's shape can be trusted on generated pictures (soft edges, stubby points):
    on 32 pictures of the shipped UNet, labelled by eye, it agrees in 28 (2026-12-07; the
    bounding-box template it used before agreed in 20, reading soft squares, triangles and stars as
    circles).  Its thresholds were set on 32 other generated pictures and on renders; the four it
    still misses are blobs between a circle and a square.  A floor: a judge change that reads
    generated shapes worse fails here."""
    agree, n = _agreement_with_hand_labels()
    assert agree >= 28, (agree, n)


def test_each_shape_measure_tells_its_shapes_apart_on_renders():
    """The measures ``read_shape`` decides on, on clean renders: a triangle narrows to its top, a
    star leaves much of its hull empty, a square covers its box's corners and a circle does not; so
    each rule has room either side on clean pictures (the generated ones are what need it)."""
    by_shape = {s: [] for s in W.SHAPES}
    for i, s in enumerate(W.sample_scenes(80, seed=5)):
        picture = W.render(s, seed=i)
        v = J.judge(picture)
        assert v.shape == s.shape, (s, v)
        _, mask = J.foreground(picture)
        ys, xs = np.nonzero(mask)
        by_shape[s.shape].append(J.shape_measures(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]))
    worst = {s: {k: (min(m[k] for m in ms), max(m[k] for m in ms)) for k in ms[0]} for s, ms in by_shape.items()}
    assert worst["三角形"]["top_width"][1] < J.TRIANGLE_TOP_WIDTH / 1.5, worst["三角形"]
    assert worst["三角形"]["solidity"][0] > J.TRIANGLE_SOLIDITY + 0.1, worst["三角形"]
    assert worst["星形"]["solidity"][1] < J.STAR_SOLIDITY - 0.1, worst["星形"]
    assert worst["正方形"]["corners"][0] > 5 * J.SQUARE_CORNERS, worst["正方形"]
    assert worst["圆形"]["corners"][1] < J.SQUARE_CORNERS / 2, worst["圆形"]
    for s in ("圆形", "正方形"):
        assert worst[s]["solidity"][0] > J.STAR_SOLIDITY + 0.1 and worst[s]["fill"][0] > J.SOFT_STAR_FILL, worst[s]


def test_judge_on_renders():
    """The judge's accuracy on 600 clean renders of random scenes: 100% on every attribute
    when this test was written (it must stay far above the models' targets)."""
    acc = J.render_accuracy(600, seed=11)
    for field, value in acc.items():
        assert value >= 0.98, (field, acc)


def test_judge_reads_each_attribute():
    base = dict(shape="星形", colour="黄色", background="紫色", size="大的", position="左边")
    v = J.judge(W.render(W.Scene(**base), seed=1))
    assert (v.shape, v.colour, v.background, v.size, v.position) == ("星形", "黄色", "紫色", "大的", "左边")
    for style in W.STYLES:
        assert J.judge(W.render(W.Scene(**base, style=style), seed=2)).style == style
    for painter in W.PAINTERS:
        assert J.judge(W.render(W.Scene(**base, painter=painter), seed=3)).painter == painter
    blank = np.full((128, 128, 3), 200, np.uint8)
    assert J.judge(blank).shape is None


def test_the_lora_verdict_applies_the_lessons_targets():
    """``evaluate.lora_verdict`` (what ``bench/experiments/lora_on_build.py`` prints as PASS / FAIL)
    asks for a rise, a dial that climbs at every step, a small leak and the picture kept."""
    from kolors_course.world import evaluate as E

    good = {"index": {0.0: 0.10, 0.5: 0.20, 1.0: 0.40, 1.5: 0.50}, "leak": 0.12, "base_plain": 0.10,
            "kept": {0.0: 1.0, 0.5: 1.0, 1.0: 0.9, 1.5: 0.5}}
    assert E.lora_verdict(good)["look"] and E.lora_verdict(good)["kept"]
    falls = {**good, "index": {**good["index"], 1.5: 0.30}}
    leaks = {**good, "leak": 0.30}
    weak = {**good, "index": {0.0: 0.10, 0.5: 0.15, 1.0: 0.20, 1.5: 0.30}}
    for bad in (falls, leaks, weak):
        assert not E.lora_verdict(bad)["look"], bad
    assert not E.lora_verdict({**good, "kept": {**good["kept"], 1.0: 0.5}})["kept"]
