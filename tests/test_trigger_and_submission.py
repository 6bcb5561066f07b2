"""One trigger word from the data set to the story (issue 10, part 4), and the
challenge's submission: upload call, discussion post, adjustable aesthetic bar (part 5)."""
import json

import pytest

import kolors_course.story.gallery as gallery
import kolors_course.story.scoring as scoring
import kolors_course.core.trigger as trigger
from kolors_course.core.profiles import KOLORS, TINY
from kolors_course.story.stories import load_story, parse_story


def _story_dict(n=8):
    return {"title": "小猫的一天", "style": "水彩", "character": "一只猫", "negative": "模糊",
            "scenes": [{"framing": "远景", "place": f"地点{i}", "action": f"动作{i}", "seed": i} for i in range(n)]}


def test_with_trigger_puts_the_word_first_once():
    assert trigger.with_trigger("一个红色的圆形", "几何风") == "几何风，一个红色的圆形"
    assert trigger.with_trigger("几何风，一个红色的圆形", ["几何风"]) == "几何风，一个红色的圆形"
    assert trigger.with_trigger("a red circle", "geo") == "geo, a red circle"
    assert trigger.with_trigger("一个圆", None) == trigger.with_trigger("一个圆", "") == "一个圆"
    assert trigger.words('["二次元风"]') == ["二次元风"]


def test_without_trigger_takes_the_word_and_its_separator_out():
    """The captions the LoRA's preservation loss reads: the inverse of with_trigger."""
    for prompt in ("一个红色的圆形，蓝色背景", "a red circle", ""):
        for words in ("几何风", ["geo", "几何风"]):
            assert trigger.without_trigger(trigger.with_trigger(prompt, words), words) == prompt
    assert trigger.without_trigger("蓝色背景，几何风，一个圆形", "几何风") == "蓝色背景，一个圆形"
    assert trigger.without_trigger("a cat, a dog", "a") == "cat, dog"      # a Latin word only whole
    assert trigger.without_trigger("一个圆形", None) == "一个圆形"


def test_choosing_the_trigger_word(tmp_path, capsys):
    assert trigger.choose_trigger_word(KOLORS) == "二次元风"
    assert "kolors profile's default" in capsys.readouterr().out
    assert trigger.choose_trigger_word(KOLORS, "水墨风", dataset_dir=tmp_path) == "水墨风"
    (tmp_path / "dataset.json").write_text(json.dumps({"trigger_word": "我的风"}), encoding="utf-8")
    assert trigger.choose_trigger_word(KOLORS, None, dataset_dir=tmp_path) == "我的风"
    assert "recorded with the data set" in capsys.readouterr().out
    # no LoRA: no trigger word in the story, whatever was asked
    assert trigger.story_trigger_words({}, "几何风", verbose=False) == []
    assert trigger.story_trigger_words({"trigger_words": '["几何风"]'}, verbose=False) == ["几何风"]
    assert trigger.story_trigger_words({"trigger_words": '["几何风"]'}, "", verbose=False) == []


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """The word set once (notebook 02's parameter) carried through a tiny data set, a short
    training run and a story bundle, as notebooks 02-04 call the package."""
    from kolors_course.data.recipe import Recipe
    from kolors_course.data.build import Captions, build_training_set
    from kolors_course.data.training_set import read_training_set
    from kolors_course.lora.files import read_lora
    from kolors_course.lora.config import TrainConfig
    from kolors_course.lora.train import train_lora
    from kolors_course.models.loading import load_pipeline
    from kolors_course.story.stories import generate_story, generation_settings

    tmp = tmp_path_factory.mktemp("trigger")
    word = "星光风"                                                # set once, here
    ds = tmp / "dataset"
    build_training_set("synthetic", ds, recipe=Recipe(min_width=48, min_height=48),
                       captions=Captions(trigger=trigger.choose_trigger_word(TINY, word)), limit=6)
    # notebook 03: nothing retyped, the word comes back from the data set
    again = trigger.choose_trigger_word(TINY, None, dataset_dir=ds)
    cfg = TrainConfig.for_profile(TINY, trigger_words=[again], max_steps=2, validate_every=None,
                                  checkpoint_every=2)
    res = train_lora(TINY, ds, tmp / "run", cfg)
    _, meta = read_lora(res.files["lora"])
    from safetensors import safe_open
    with safe_open(str(res.files["lora_kohya"]), "pt") as f:
        meta_kohya = f.metadata()
    # notebook 04: the word comes back from the LoRA file
    tale = load_story("ink_fox").with_trigger(trigger.story_trigger_words(meta, None, verbose=False))
    settings = generation_settings(tale, TINY)
    records = generate_story(load_pipeline(TINY), tale, settings, tmp / "story")
    grid = tmp / "grid.png"
    gallery.story_grid(records, grid)
    scores = scoring.Scores([5.0] * 8, 5.0, 6.0, False)
    page = gallery.write_gallery(records, tale, scores, {"file": "lora.safetensors", "scale": 1.0},
                                 tmp / "gallery.html", "tiny")
    bundle = gallery.write_bundle(tmp, "测试队", tale, records, scores,
                                  {"lora": res.files["lora"], "lora_kohya": res.files["lora_kohya"]},
                                  meta, settings, grid, page, modelscope_user="alice")
    return dict(word=word, ds=ds, run=res.run_dir, cfg=cfg, meta=meta, meta_kohya=meta_kohya, tale=tale,
                records=records, bundle=bundle, rows=read_training_set(ds))


def test_trigger_word_flows_from_captions_to_the_story(flow):
    word = flow["word"]
    # data set: every caption starts with it, and dataset.json records it
    assert all(text.startswith(word + "，") for _, text in flow["rows"])
    assert json.loads((flow["ds"] / "dataset.json").read_text(encoding="utf-8"))["trigger_word"] == word
    # training: config, validation prompts, both LoRA files' metadata
    assert flow["cfg"].trigger_words == (word,)
    assert all(p.startswith(word + "，") for p in flow["cfg"].validation_prompts)
    recorded = json.loads((flow["run"] / "train_config.json").read_text(encoding="utf-8"))
    assert recorded["trigger_words"] == [word] and recorded["validation_prompts"][0].startswith(word)
    assert json.loads(flow["meta"]["trigger_words"]) == [word] == json.loads(flow["meta_kohya"]["trigger_words"])
    # story: every prompt starts with it; prompts.json, the model card and the gallery show it
    assert all(r["prompt"].startswith(word + "，") for r in flow["records"])
    prompts = json.loads((flow["bundle"] / "prompts.json").read_text(encoding="utf-8"))
    assert prompts["trigger_word"] == word and prompts["story"]["trigger"] == word
    assert all(im["prompt"].startswith(word) for im in prompts["images"])
    card = (flow["bundle"] / "model_card.md").read_text(encoding="utf-8")
    assert f"- trigger words: {word}" in card and "(none)" not in card
    assert word in (flow["bundle"] / "gallery.html").read_text(encoding="utf-8")


def test_a_finished_run_is_not_reused_for_another_trigger_word(flow):
    from kolors_course.lora.config import TrainConfig, TrainingError
    from kolors_course.lora.train import train_lora

    other = TrainConfig.for_profile(TINY, trigger_words=["别的风"], max_steps=2, validate_every=None,
                                    checkpoint_every=2)
    with pytest.raises(TrainingError, match="trigger_words"):
        train_lora(TINY, flow["ds"], flow["run"], other, reuse_finished=True)


def test_training_warns_when_the_trigger_word_is_in_no_caption(flow, tmp_path):
    from kolors_course.lora.config import TrainConfig, TrainingError
    from kolors_course.lora.train import train_lora

    cfg = TrainConfig.for_profile(TINY, trigger_words=["不在标注里"], max_steps=1, validate_every=None,
                                  preserve_weight=0)
    with pytest.warns(UserWarning, match="in none of the"):
        train_lora(TINY, flow["ds"], tmp_path / "run", cfg)
    # with the profile's preservation on, a word in no caption leaves it nothing to preserve: refused
    preserving = TrainConfig.for_profile(TINY, trigger_words=["不在标注里"], max_steps=1, validate_every=None)
    assert preserving.preserve_weight > 0
    with pytest.raises(TrainingError, match="none of the .* captions holds them"):
        train_lora(TINY, flow["ds"], tmp_path / "run2", preserving)


def test_bundle_holds_the_upload_call_and_the_post(flow):
    bundle = flow["bundle"]
    assert bundle.name == "测试队-可图Kolors训练-ink_fox"
    text = (bundle / "UPLOAD.md").read_text(encoding="utf-8")
    # the ModelScope SDK call, with this bundle's own names
    assert "from modelscope.hub.api import HubApi" in text and "api.login(" in text
    assert "model_id='alice/kolors-lora-ink_fox'" in text
    assert f"model_dir={bundle.name!r}" in text and f"chinese_name={bundle.name!r}" in text
    # the post: title in the required format, text with the link, the trigger word, the 8 prompts, the score
    link = "https://www.modelscope.cn/models/alice/kolors-lora-ink_fox"
    assert f"测试队+{link}+作品图(8图故事)" in text
    assert text.count(link) >= 3 and flow["word"] in text and "5.000" in text
    for r in flow["records"]:
        assert r["prompt"] in text
    assert "below 6" in text                                  # the tiny score is under the bar
    # push_model's configuration file and the page ModelScope shows are there, and in the manifest
    assert (bundle / "configuration.json").exists() and (bundle / "README.md").exists()
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    assert "UPLOAD.md" in manifest["files_sha256"]


def test_the_real_sdk_has_the_calls_the_upload_text_uses():
    import inspect

    from modelscope.hub.api import HubApi

    assert "token" in inspect.signature(HubApi.login).parameters
    assert {"model_id", "model_dir"} <= set(inspect.signature(HubApi.push_model).parameters)


def test_post_title_and_names():
    assert gallery.post_title("队A", "https://x/y") == "队A+https://x/y+作品图(8图故事)"
    with pytest.raises(ValueError):
        gallery.post_title(" ", "https://x/y")
    assert gallery.modelscope_repo_name("Team 7", "ink_fox") == "Team-7-kolors-lora-ink_fox"


def test_threshold_changes_the_verdict(tmp_path):
    s = scoring.Scores([5.8, 5.6], 5.7, scoring.VALIDITY_THRESHOLD, True)
    assert scoring.VALIDITY_THRESHOLD == 6.0 and not s.valid
    lower = s.with_threshold(5.5)
    assert lower.valid and "meets the challenge's bar of 5.5" in lower.report()
    with pytest.raises(scoring.ScorerError):
        s.with_threshold(11)
    # the bundle's texts follow the verdict
    tale = parse_story(_story_dict())
    recs = [{"index": i + 1, "prompt": tale.prompt(i), "seed": sc.seed} for i, sc in enumerate(tale.scenes)]
    settings = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 4.0, "lora_scale": 1.0}
    up = gallery.upload_text(tmp_path / "队-可图Kolors训练-t", "队", tale, recs, lower, {}, settings)
    assert "meets the bar of 5.5" in up and "Warning" not in up
    down = gallery.upload_text(tmp_path / "队-可图Kolors训练-t", "队", tale, recs, s, {}, settings)
    assert "is BELOW the bar of 6" in down and "Warning" in down
    assert "meets the bar of 5.5" in gallery.model_card("队", tale, {}, settings, lower)


def test_scorer_takes_the_threshold(tiny, tiny_pipe):
    from kolors_course.generation.text2image import generate

    imgs = [generate(tiny_pipe, "猫", seed=s) for s in range(2)]
    low = scoring.AestheticScorer(tiny, threshold=0).score(imgs)
    high = scoring.AestheticScorer(tiny, threshold=10).score(imgs)
    assert low.per_image == high.per_image
    assert low.valid and not high.valid and low.threshold == 0 and high.threshold == 10


def test_a_second_bundle_keeps_the_first_one_beside_it(flow, tmp_path):
    """Notebook 04 run again (say, at another lora_scale) into the same folder: the bundle a team
    may already have uploaded is kept as <name>.previous, not deleted."""
    import shutil

    from kolors_course.story import gallery, scoring

    src = flow["bundle"]
    parent = tmp_path / "out"
    parent.mkdir()
    first = parent / src.name
    shutil.copytree(src, first)
    image = (first / "images" / "01.png").read_bytes()
    records = [dict(r) for r in flow["records"]]
    records[0]["image"] = records[0]["image"].transpose(0)       # a different first picture
    lora = {k: src / f"{k}.safetensors" for k in ("lora", "lora_kohya")}
    again = gallery.write_bundle(parent, "测试队", flow["tale"], records, scoring.Scores([5.0] * 8, 5.0, 6.0, False),
                                 lora, flow["meta"], {"lora_scale": 1.5, **_settings(flow)},
                                 src / "grid.png", src / "gallery.html")
    assert again == first
    assert (first / "images" / "01.png").read_bytes() != image
    kept = parent / f"{src.name}.previous"
    assert (kept / "images" / "01.png").read_bytes() == image
    assert json.loads((kept / "manifest.json").read_text(encoding="utf-8"))["files_sha256"]


def _settings(flow):
    from kolors_course.story.stories import generation_settings

    return {k: v for k, v in generation_settings(flow["tale"], TINY).items() if k != "lora_scale"}


def test_notebooks_find_the_kohya_copy_where_training_wrote_it(flow):
    """Notebooks 04 and 05 look up the ComfyUI copy with kc.kohya_lora_file: the export's own rule."""
    import kolors_course as kc
    from kolors_course.lora.files import kohya_path

    lora = flow["run"] / "lora.safetensors"
    assert kc.kohya_lora_file(lora) == kohya_path(lora) and kc.kohya_lora_file(lora).is_file()
    assert kohya_path("x/my.safetensors").name == "my_kohya.safetensors"
