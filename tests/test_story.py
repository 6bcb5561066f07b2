"""Stories, LoRA strength, scoring, gallery, bundle and class-wide batch runs."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import kolors_course.story.gallery as gallery
import kolors_course.runner as runner
import kolors_course.story.scoring as scoring
import kolors_course.story.stories as story
from kolors_course.story.stories import StoryError, load_story, parse_story

ROOT = Path(__file__).resolve().parent.parent


def _story_dict(n=8):
    return {"title": "t", "style": "水彩", "character": "一只猫", "negative": "模糊",
            "settings": {"cfg_scale": 4.0, "lora_scale": 0.8},
            "scenes": [{"framing": "远景", "place": f"地点{i}", "action": f"动作{i}", "seed": i}
                       for i in range(n)]}


def test_bundled_stories_are_valid_and_different():
    fox, robot = load_story("ink_fox"), load_story("lighthouse_robot")
    assert len(fox.scenes) == len(robot.scenes) == 8
    assert fox.style != robot.style
    assert any("\u4e00" <= ch <= "\u9fff" for ch in fox.prompt(0))
    # the template: style, framing, character, place, action; character in every prompt
    assert fox.prompt(0) == "，".join([fox.style, "远景", fox.character, "月夜下的竹林",
                                      "小狐狸抬头望着熄灭的灯笼"])
    assert all(fox.character in p for p in fox.prompts())
    assert robot.prompt(0).startswith(robot.style + ", wide shot, " + robot.character)


def test_story_validation_messages():
    with pytest.raises(StoryError, match="the challenge asks for at least 8"):
        parse_story(_story_dict(5))
    bad = _story_dict()
    bad["scenes"][2]["seed"] = -4
    bad["scenes"][3].pop("place")
    bad["settings"]["height"] = 100
    bad["settings"]["colour"] = 1
    with pytest.raises(StoryError) as err:
        parse_story(bad)
    msg = str(err.value)
    assert "scene 3: seed" in msg and "scene 4 lacks place" in msg and "multiple of 64" in msg
    assert "unknown settings ['colour']" in msg
    dup = _story_dict()
    dup["scenes"][1]["seed"] = 0
    with pytest.raises(StoryError, match="used twice"):
        parse_story(dup)
    with pytest.raises(StoryError, match="not found"):
        load_story("no_such_story")


def test_story_yaml_is_parsed_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("title: !!python/object/apply:os.system ['echo hacked']\n", encoding="utf-8")
    with pytest.raises(StoryError, match="not valid YAML"):
        load_story(p)


def test_settings_follow_the_profile(tiny):
    from kolors_course.core.profiles import KOLORS
    s = parse_story(_story_dict())
    t = story.generation_settings(s, tiny)
    assert (t["height"], t["steps"], t["lora_scale"]) == (64, 2, 0.8)
    k = story.generation_settings(load_story("ink_fox"), KOLORS)
    assert (k["height"], k["steps"], k["cfg_scale"]) == (1024, 50, 4.0)


def test_story_generation_is_reproducible(tiny_pipe, tiny, tmp_path):
    s = parse_story(_story_dict())
    settings = story.generation_settings(s, tiny)
    a = story.generate_story(tiny_pipe, s, settings, tmp_path / "a")
    b = story.generate_story(tiny_pipe, s, settings, str(tmp_path / "b"))      # a folder given as text too
    assert len(a) == 8 and (tmp_path / "a" / "scene_08.png").exists()
    for ra, rb in zip(a, b):
        assert np.array_equal(np.asarray(ra["image"]), np.asarray(rb["image"]))
    assert not np.array_equal(np.asarray(a[0]["image"]), np.asarray(a[1]["image"]))


def test_lora_strength_sweep(tiny, tmp_path):
    from kolors_course.data.recipe import Recipe
    from kolors_course.data.build import build_training_set
    from kolors_course.lora.strength import set_lora_scale
    from kolors_course.lora.config import TrainConfig
    from kolors_course.lora.train import train_lora
    from kolors_course.models.loading import load_pipeline
    from kolors_course.generation.text2image import generate
    ds = tmp_path / "ds"
    build_training_set("synthetic", ds, recipe=Recipe(min_width=48, min_height=48), limit=6)
    res = train_lora(tiny, ds, tmp_path / "run", TrainConfig.for_profile(tiny, max_steps=15, learning_rate=1e-2,
                                                                      validate_every=None))
    pipe = load_pipeline(tiny)
    base = np.asarray(generate(pipe, "猫", seed=1), dtype=int)
    imgs = {}
    for s in (0.0, 1.0, 1.5, 0.0, 1.0):
        set_lora_scale(pipe, res.files["lora"], s)
        imgs.setdefault(s, []).append(np.asarray(generate(pipe, "猫", seed=1), dtype=int))
    assert np.array_equal(imgs[0.0][0], base) and np.array_equal(imgs[0.0][1], base)
    assert np.array_equal(imgs[1.0][0], imgs[1.0][1]), "strength changes must not accumulate"
    fused = np.asarray(generate(load_pipeline(tiny, lora=res.files["lora"]), "猫", seed=1), dtype=int)
    assert np.abs(imgs[1.0][0] - fused).max() <= 1
    assert np.abs(imgs[1.5][0] - imgs[1.0][0]).mean() > 0.1
    with pytest.raises(RuntimeError, match="already has a LoRA fused"):
        set_lora_scale(load_pipeline(tiny, lora=res.files["lora"]), res.files["lora"], 0.5)
    # the sweep shows each strength and leaves the pipeline at the strength it found (1.0 here)
    from kolors_course.lora.strength import strength_sweep
    from kolors_course.story.stories import load_story

    tale = load_story(tiny.story)
    settings = dict(cfg_scale=4.0, steps=3, height=tiny.height, width=tiny.width)
    sweep = strength_sweep(pipe, res.files["lora"], tale, 1, settings, values=(0.0, 1.5))
    assert [label for label, _ in sweep] == ["strength 0.0", "strength 1.5"]
    assert not np.array_equal(np.asarray(sweep[0][1]), np.asarray(sweep[1][1]))
    assert np.array_equal(np.asarray(generate(pipe, "猫", seed=1), dtype=int), imgs[1.0][0])
    with pytest.raises(ValueError, match="at least one strength"):
        strength_sweep(pipe, res.files["lora"], tale, 1, settings, values=[])
    # the second row: the same scene without the trigger word (the strength-0 picture differs
    # only by the word; a story without a trigger word gets no second row)
    called = tale.with_trigger(["几何风"])
    both = strength_sweep(pipe, res.files["lora"], called, 1, settings, values=(0.0, 1.5), without_trigger=True)
    assert [label for label, _ in both] == ["strength 0.0", "strength 1.5", "no trigger, 0.0", "no trigger, 1.5"]
    plain0 = np.asarray(both[2][1], dtype=int)
    assert np.array_equal(plain0, np.asarray(sweep[0][1], dtype=int))    # = the story as written, base model
    assert not np.array_equal(plain0, np.asarray(both[0][1], dtype=int))
    assert len(strength_sweep(pipe, res.files["lora"], tale, 1, settings, values=(0.0,), without_trigger=True)) == 1


def test_tiny_scorer_runs_the_real_classes(tiny, tiny_pipe):
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from kolors_course.generation.text2image import generate
    scorer = scoring.AestheticScorer(tiny)
    assert isinstance(scorer.model, AestheticsPredictorV2Linear)
    imgs = [generate(tiny_pipe, "猫", seed=s) for s in range(3)]
    a, b = scorer.score(imgs), scorer.score(imgs)
    assert a.per_image == b.per_image and len(a.per_image) == 3
    assert not a.meaningful and "stand-in" in a.report()
    assert a.valid == (a.mean >= 6.0)
    fake = scoring.Scores([6.5, 5.0], 5.75, 6.0, True)
    assert not fake.valid and "is below" in fake.report()


def test_kolors_scorer_offline_is_a_clear_error(tmp_path, monkeypatch):
    from kolors_course.core.profiles import choose_profile
    monkeypatch.setenv("KOLORS_COURSE_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(scoring.ScorerError, match="aesthetics-predictor-v2"):
        scoring.scorer_folder(choose_profile("kolors"))


def test_team_folder_name_is_safe():
    assert gallery.team_folder_name("Team A", "ink_fox") == "Team_A-可图Kolors训练-ink_fox"
    assert "/" not in gallery.team_folder_name("../../etc", "x")
    with pytest.raises(ValueError, match="team_name"):
        gallery.team_folder_name("  ", "x")


@pytest.fixture(scope="module")
def course_04(course_run):
    """Notebook 04 of the course run (tests/conftest.py: after 02 and 03, so with a real LoRA, and
    with a Chinese team name)."""
    proc, out = course_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "04_story"


def test_notebook_04_outputs_and_bundle(course_04):
    bundle = course_04 / "测试队-可图Kolors训练-little_star"      # the tiny profile's story
    for name in ("lora.safetensors", "lora_kohya.safetensors", "model_card.md", "prompts.json", "grid.png",
                 "scores.json", "manifest.json", "gallery.html"):
        assert (bundle / name).exists(), name
    assert sorted(p.name for p in (bundle / "images").iterdir()) == [f"{i:02d}.png" for i in range(1, 9)]
    prompts = json.loads((bundle / "prompts.json").read_text(encoding="utf-8"))
    assert len(prompts["images"]) == 8 and all({"prompt", "seed", "negative_prompt", "cfg_scale", "steps",
                                                 "lora_scale"} <= set(p) for p in prompts["images"])
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    import hashlib
    for rel, digest in manifest["files_sha256"].items():
        assert hashlib.sha256((bundle / rel).read_bytes()).hexdigest() == digest
    assert manifest["packages"]["diffsynth"] == "1.1.9"
    card = (bundle / "model_card.md").read_text(encoding="utf-8")
    assert "recommended LoRA scale" in card and "rank" in card
    assert (course_04 / "strength_sweep.png").exists() and (course_04 / "story_grid.png").exists()


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Injected into a copy of a gallery page: draws each distinct Chinese character of
# the <h1> on a canvas in the title's own font, and compares the pixels with those
# of characters no font draws (private-use code points), i.e. the missing-glyph box.
# A character that comes out as that box, or two characters that come out alike,
# are boxes ("tofu"): no font on the machine has them.
_CJK_PROBE = r"""
<script>
window.addEventListener('load', function () {
  document.fonts.ready.then(function () {
    var h1 = document.querySelector('h1'), cs = getComputedStyle(h1);
    var font = cs.fontStyle + ' ' + cs.fontWeight + ' ' + cs.fontSize + ' ' + cs.fontFamily;
    function shape(ch) {
      var c = document.createElement('canvas'); c.width = 96; c.height = 96;
      var x = c.getContext('2d'); x.font = font; x.textBaseline = 'top'; x.fillStyle = '#000';
      x.fillText(ch, 8, 8);
      var d = x.getImageData(0, 0, 96, 96).data, bits = [];
      for (var i = 3; i < d.length; i += 4) bits.push(d[i] > 100 ? 1 : 0);
      return bits.join('');
    }
    var tofu = ['\uE000', '\uE123', '\uF0F0'].map(shape);
    var chars = Array.from(new Set(Array.from(h1.textContent).filter(function (ch) {
      return /[\u3400-\u9fff]/.test(ch); })));
    var seen = {}, boxes = [];
    chars.forEach(function (ch) {
      var s = shape(ch);
      if (tofu.indexOf(s) >= 0 || seen[s] || s.indexOf('1') < 0) boxes.push(ch);
      seen[s] = true;
    });
    document.body.setAttribute('data-cjk-chars', chars.join(''));
    document.body.setAttribute('data-cjk-boxes', boxes.join(''));
    document.body.setAttribute('data-cjk-probe', 'done');
  });
});
</script>
"""


def _render(page: Path, tmp_path: Path) -> str:
    """The gallery (with the glyph probe added) as headless chromium leaves its DOM."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _CJK_PROBE + "</body>"),
                     encoding="utf-8")
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _body_attr(dom: str, name: str) -> str | None:
    import re
    m = re.search(rf'<body[^>]*\s{name}="([^"]*)"', dom)
    return m.group(1) if m else None


def _assert_title_renders_in_cjk(dom: str):
    assert _body_attr(dom, "data-cjk-probe") == "done", dom[:500]
    chars, boxes = _body_attr(dom, "data-cjk-chars"), _body_attr(dom, "data-cjk-boxes")
    assert chars, "the title has no Chinese characters to check"
    assert boxes == "", (f"title characters {boxes!r} of {chars!r} render as boxes (tofu): no CJK font; "
                         "`make browser` installs fonts-noto-cjk")


def _gallery_inputs(n=8):
    from PIL import Image
    s = parse_story(_story_dict(n) | {"title": "水墨小狐狸的灯笼"})
    colours = [(200, 30 * i, 40) for i in range(n)]

    def recs(shift):
        return [{"index": i + 1, "prompt": s.prompt(i), "negative_prompt": s.negative, "seed": sc.seed,
                 "cfg_scale": 4.0, "steps": 2, "height": 64, "width": 64, "framing": sc.framing,
                 "place": sc.place, "action": sc.action,
                 "image": Image.new("RGB", (64, 64), tuple((c + shift) % 256 for c in colours[i]))}
                for i, sc in enumerate(s.scenes)]
    scores = scoring.Scores([5.0] * n, 5.0, 6.0, False)
    return s, recs(0), recs(90), scores


def test_gallery_pairs_base_and_lora_with_each_images_settings(tmp_path):
    s, base, lora, scores = _gallery_inputs()
    info = {"file": "runs/x/lora.safetensors", "scale": 0.8, "lora_rank": 4}
    page = gallery.write_gallery(lora, s, scores, info, tmp_path / "g.html", "tiny", base_records=base).read_text(
        encoding="utf-8")
    assert 'data-images-expected="16"' in page and page.count("<img ") == 16
    assert page.count('class="variant base"') == 8 and page.count('class="variant lora"') == 8
    # base left, LoRA right, in every scene
    for scene in page.split('<section class="scene">')[1:]:
        assert scene.index('class="variant base"') < scene.index('class="variant lora"')
        assert "<dt>LoRA scale</dt><dd>none (base model)</dd>" in scene
        assert "<dt>LoRA scale</dt><dd>0.8</dd>" in scene
        assert "<dt>steps</dt><dd>2</dd>" in scene and "<dt>cfg</dt><dd>4.0</dd>" in scene
    assert "<dt>seed</dt><dd>7</dd>" in page
    assert gallery.CJK_FONT_STACK in page and "Noto Sans CJK SC" in gallery.CJK_FONT_STACK
    # one image per scene without base images; no LoRA: the scale says so
    single = gallery.write_gallery(base, s, scores, {"file": "none (base model)", "scale": 0.8},
                                   tmp_path / "b.html", "tiny").read_text(encoding="utf-8")
    assert single.count("<img ") == 8 and "variant base" not in single
    assert single.count("<dd>none (base model)</dd>") == 8
    with pytest.raises(ValueError, match="same scenes"):
        gallery.write_gallery(lora, s, scores, info, tmp_path / "x.html", "tiny", base_records=base[:3])


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (make browser installs it)")
def test_gallery_side_by_side_renders_with_chinese_title_in_chromium(tmp_path):
    s, base, lora, scores = _gallery_inputs()
    page = gallery.write_gallery(lora, s, scores, {"file": "l.safetensors", "scale": 0.8}, tmp_path / "g.html",
                                 "tiny", base_records=base)
    dom = _render(page, tmp_path)
    assert _body_attr(dom, "data-images-loaded") == "16", dom[:500]
    _assert_title_renders_in_cjk(dom)


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (make browser installs it)")
def test_gallery_renders_in_headless_chromium(course_04, tmp_path):
    dom = _render(course_04 / "gallery.html", tmp_path)
    expected = _body_attr(dom, "data-images-expected")
    assert expected in ("8", "16") and _body_attr(dom, "data-images-loaded") == expected, dom[:500]
    _assert_title_renders_in_cjk(dom)


def test_batch_of_two_sets_makes_two_galleries_and_an_index(tmp_path):
    batch = tmp_path / "class.yaml"
    out = tmp_path / "class"
    batch.write_text(yaml.safe_dump({
        "profile": "tiny", "out": str(out), "notebooks": ["04"],
        "sets": [{"name": "fox", "parameters": {"story": "ink_fox", "team_name": "a"}},
                 {"name": "robot", "parameters": {"story": "lighthouse_robot", "team_name": "b"}},
                 {"name": "broken", "parameters": {"story": "no_such_story"}}]}, allow_unicode=True))
    import kolors_course.cli as cli
    code = cli.main(["batch", str(batch)])
    assert code == 1        # one set failed, and the others still ran
    entries = json.loads((out / "batch.json").read_text(encoding="utf-8"))
    assert [e["status"] for e in entries] == ["ok", "ok", "failed"]
    assert "no_such_story" in entries[2]["detail"]
    index = (out / "index.html").read_text(encoding="utf-8")
    for name in ("fox", "robot"):
        assert (out / name / "04_story" / "gallery.html").exists()
        assert f"{name}/04_story/gallery.html" in index


def test_batch_file_errors(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("sets: []\n")
    with pytest.raises(ValueError, match="non-empty"):
        runner.load_batch_file(p)
    p.write_text("sets: [{name: ../x}]\n")
    with pytest.raises(ValueError, match="plain folder name"):
        runner.load_batch_file(p)
    p.write_text("sets: [{name: a}, {name: a}]\n")
    with pytest.raises(ValueError, match="twice"):
        runner.load_batch_file(p)


def test_a_real_models_story_on_tiny_gets_a_note_and_the_tiny_story_none(capsys):
    """A class batch once told ink_fox on tiny: eight near-blank pictures and no word why."""
    from kolors_course.core.profiles import choose_profile
    from kolors_course.story.stories import generation_settings, load_story

    tiny, kolors = choose_profile("tiny", verbose=False), choose_profile("kolors", verbose=False)
    generation_settings(load_story("ink_fox"), tiny)
    assert "written for a real model" in capsys.readouterr().out
    generation_settings(load_story("little_star"), tiny)
    generation_settings(load_story("ink_fox"), kolors)
    assert capsys.readouterr().out == ""


def test_notebook_05s_generated_reference_is_notebook_04s_scene_one(tiny_pipe, tmp_path):
    """kolors' default reference is scene 1 generated: the same picture notebook 04 made."""
    import kolors_course as kc

    prof = kc.choose_profile("tiny", verbose=False)
    tale = kc.load_story("little_star")
    settings = kc.generation_settings(tale, prof)
    ref, notes = kc.reference_picture(tiny_pipe, None, kc.scene_settings(tale, settings, 0))
    first = kc.generate_story(tiny_pipe, tale, settings, tmp_path)[0]["image"]
    assert np.array_equal(np.asarray(ref), np.asarray(first)) and notes


def test_notebook_03s_choices_left_at_none_take_the_profiles():
    import kolors_course as kc

    prof = kc.choose_profile("tiny", verbose=False)
    cfg = kc.TrainConfig.from_choices(prof, "几何风", rank=None, alpha=8.0, learning_rate=None)
    assert (cfg.rank, cfg.alpha, cfg.learning_rate) == (prof.lora_rank, 8.0, prof.learning_rate)
    assert cfg.trigger_words == ("几何风",) and cfg.preserve_weight == prof.lora_preserve_weight
    assert kc.TrainConfig.from_choices(prof, None).preserve_weight == 0      # no word, nothing to preserve
