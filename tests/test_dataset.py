"""Dataset building: every bad-input case, the data-juicer checks, and the output layout."""
import csv
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import kolors_course.data.clean as data_clean
import kolors_course.data.recipe as data_filter
import kolors_course.data.sources as data_sources
import kolors_course.data.build as dataset
import kolors_course.data.training_set as training_set
from kolors_course.data.recipe import Recipe
from kolors_course.data.build import Captions, build_training_set
from kolors_course.data.training_set import DatasetError

SMALL = Recipe(min_width=48, min_height=48, min_ratio=0.5, max_ratio=2.0, min_size="1KB")


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def _img(path, size=(64, 64), colour=(200, 30, 30), mode="RGB", **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, colour)
    for x in range(0, size[0], 3):           # some texture so JPEGs are not tiny
        for y in range(0, size[1], 5):
            im.putpixel((x, y), ((x * 7) % 256, (y * 11) % 256, 90))
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, **kw)
    return path


@pytest.fixture(scope="module")
def synthetic_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "set"
    res = build_training_set("synthetic", out, recipe=SMALL, captions=Captions(trigger="几何风"))
    return res


def test_synthetic_build_drops_something_at_every_stage(synthetic_build):
    res = synthetic_build
    stages = {d["stage"] for d in res.dropped}
    assert {"decode", "duplicate", "image_shape_filter", "image_aspect_ratio_filter",
            "image_size_filter"} <= stages
    reasons = {d["id"]: d["reason"] for d in res.dropped}
    assert reasons["bad_empty.jpg"] == "empty file (0 bytes)"
    assert "not an image" in reasons["bad_not_image.png"]
    assert "truncated" in reasons["bad_truncated.jpg"]
    assert "same file content as" in reasons["odd_duplicate.jpg"]
    assert reasons["odd_too_small.png"] == "width 21 px < 48 px, height 21 px < 48 px"
    assert "aspect ratio" in reasons["odd_too_wide.png"]
    assert "file size" in reasons["odd_blank.jpg"]
    assert res.n_out == res.n_in - len(res.dropped)
    assert [c[0] for c in res.counts][-3:] == ["image_shape_filter", "image_aspect_ratio_filter",
                                               "image_size_filter"]


def test_training_folder_layout(synthetic_build):
    train = synthetic_build.train_dir
    rows = list(csv.DictReader((train / "metadata.csv").open(encoding="utf-8")))
    assert list(rows[0]) == ["file_name", "text"]
    assert len(rows) == synthetic_build.n_out == len(list(train.glob("*.jpg")))
    for r in rows:
        with Image.open(train / r["file_name"]) as im:
            assert im.mode == "RGB" and im.format == "JPEG"
        assert r["text"].startswith("几何风，")
    # one caption per image, not one word for all
    assert len({r["text"] for r in rows}) > len(rows) // 2
    for name in ("recipe.yaml", "report/report.json", "report/sizes.png", "report/preview.png",
                 "dataset.json"):
        assert (synthetic_build.folder / name).exists(), name


def test_caption_cases(synthetic_build):
    kept = {k["id"]: k for k in synthetic_build.report["kept"]}
    assert "caption from template" in kept["odd_no_caption.jpg"]["notes"]
    assert "构图" in kept["odd_no_caption.jpg"]["caption"]
    assert any("not UTF-8" in n for n in kept["odd_gbk_caption.jpg"]["notes"])
    assert any("empty" in n for n in kept["odd_empty_caption.jpg"]["notes"])


def test_recipe_yaml_is_safe_and_accepted_by_dj_process(synthetic_build, tmp_path):
    cfg = yaml.safe_load((synthetic_build.folder / "recipe.yaml").read_text(encoding="utf-8"))
    assert cfg["skip_op_error"] is False and cfg["dataset_path"] == "dj_input.jsonl"
    assert [next(iter(op)) for op in cfg["process"]] == ["image_shape_filter",
                                                         "image_aspect_ratio_filter", "image_size_filter"]
    dj = Path(sys.executable).parent / "dj-process"
    proc = subprocess.run([str(dj), "--config", "recipe.yaml", "--export_path", str(tmp_path / "k.jsonl"),
                           "--work_dir", str(tmp_path / "w")], cwd=synthetic_build.folder,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = (tmp_path / "k.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(kept) == synthetic_build.n_out


def test_rebuild_gives_same_result_and_keeps_source(tmp_path):
    src = data_sources.make_synthetic_source(tmp_path / "src", n=8)
    before = _tree_hash(src)
    out = tmp_path / "out"
    a = build_training_set(str(src), out, recipe=SMALL)
    meta_a = (out / "train" / "metadata.csv").read_bytes()
    files_a = sorted(p.name for p in (out / "train").iterdir())
    b = build_training_set(str(src), out, recipe=SMALL)
    assert (out / "train" / "metadata.csv").read_bytes() == meta_a
    assert sorted(p.name for p in (out / "train").iterdir()) == files_a
    assert a.n_out == b.n_out
    assert _tree_hash(src) == before, "the source folder must never change"
    assert not list(tmp_path.glob(".out.*")), "no temporary folders left behind"


def test_empty_result_is_an_error_and_keeps_the_old_set(tmp_path):
    src = data_sources.make_synthetic_source(tmp_path / "src", n=8)
    out = tmp_path / "out"
    build_training_set(str(src), out, recipe=SMALL)
    meta = (out / "train" / "metadata.csv").read_bytes()
    with pytest.raises(DatasetError) as err:
        build_training_set(str(src), out, recipe=Recipe(min_width=4096, min_height=4096))
    msg = str(err.value)
    assert "No image is left" in msg and "image_shape_filter" in msg and "Loosen" in msg
    assert (out / "train" / "metadata.csv").read_bytes() == meta


def test_out_folder_not_made_by_kit_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not made by this kit"):
        build_training_set("synthetic", tmp_path / "mine", recipe=SMALL)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


def test_data_juicer_error_is_not_silent(tmp_path, monkeypatch):
    real = data_filter.write_dj_input

    def with_missing_file(items, path, base):
        real(items, path, base)
        with path.open("a", encoding="utf-8") as f:
            f.write('{"id": "ghost", "images": ["staging/does_not_exist.jpg"], "text": "x"}\n')

    monkeypatch.setattr(data_filter, "write_dj_input", with_missing_file)
    src = data_sources.make_synthetic_source(tmp_path / "src", n=6)
    with pytest.raises(DatasetError, match="data-juicer"):
        build_training_set(str(src), tmp_path / "out", recipe=SMALL)
    assert not (tmp_path / "out").exists()


def test_vanished_samples_are_detected(tmp_path, monkeypatch):
    real = data_filter.run_recipe

    def lying(folder, recipe, n, verbose=False):
        return real(folder, recipe, n + 1, verbose)     # one more went in than came out

    monkeypatch.setattr(dataset.data_filter, "run_recipe", lying)
    src = data_sources.make_synthetic_source(tmp_path / "src", n=6)
    with pytest.raises(DatasetError, match="vanished"):
        build_training_set(str(src), tmp_path / "out", recipe=SMALL)


# --- single-image cases ------------------------------------------------------------
def test_truncated_detected_even_after_data_juicer_import(tmp_path):
    import data_juicer  # noqa: F401  (it sets ImageFile.LOAD_TRUNCATED_IMAGES = True)
    p = _img(tmp_path / "a.jpg", quality=95)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ValueError, match="truncated"):
        data_clean.decode(p)


def test_modes_are_converted_to_rgb(tmp_path):
    cases = {"rgba.png": "RGBA", "pal.png": "P", "grey.png": "L", "cmyk.jpg": "CMYK"}
    for name, mode in cases.items():
        img, _ = data_clean.decode(_img(tmp_path / name, mode=mode))
        rgb, notes = data_clean.to_rgb(img)
        assert rgb.mode == "RGB" and notes, name


def test_transparency_goes_on_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgb, notes = data_clean.to_rgb(im)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert "transparency flattened on white" in notes


def test_16_bit_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype="<u2")
    rgb, notes = data_clean.to_rgb(Image.fromarray(arr))
    assert 120 <= rgb.getpixel((0, 0))[0] <= 135
    assert any("8 bits" in n for n in notes)


def test_exif_rotation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    p = _img(tmp_path / "r.jpg", size=(40, 80), exif=exif)
    img, notes = data_clean.decode(p)
    assert img.size == (80, 40) and notes == ["EXIF rotation applied"]


def test_decompression_bomb_is_dropped(tmp_path, monkeypatch):
    p = _img(tmp_path / "big.png", size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="decompression-bomb"):
        data_clean.decode(p)


def test_zero_byte_and_non_image(tmp_path):
    (tmp_path / "z.jpg").write_bytes(b"")
    (tmp_path / "t.png").write_text("hello")
    with pytest.raises(ValueError, match="0 bytes"):
        data_clean.decode(tmp_path / "z.jpg")
    with pytest.raises(ValueError, match="not an image"):
        data_clean.decode(tmp_path / "t.png")


def test_metadata_paths_outside_the_folder_are_refused(tmp_path):
    src = tmp_path / "src"
    _img(src / "ok.jpg", quality=95)
    _img(tmp_path / "outside.jpg", quality=95)
    (src / "metadata.csv").write_text("file_name,text\nok.jpg,好\n../outside.jpg,坏\n/etc/passwd,坏\n",
                                      encoding="utf-8")
    items = data_sources.read_folder(src)
    refused = [it for it in items if it.path is None]
    assert sorted(it.id for it in refused) == ["../outside.jpg", "/etc/passwd"]
    res = build_training_set(str(src), tmp_path / "out", recipe=Recipe(min_width=8, min_height=8))
    assert res.n_out == 1
    assert {d["id"] for d in res.dropped} == {"../outside.jpg", "/etc/passwd"}
    assert all("outside the dataset folder" in d["reason"] for d in res.dropped)


def test_metadata_jsonl_and_missing_captions_policy(tmp_path):
    src = tmp_path / "src"
    _img(src / "a.jpg", quality=95)
    _img(src / "b.jpg", colour=(20, 200, 20), quality=95)
    (src / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "一只猫"}\n'
                                        '{"file_name": "b.jpg", "text": ""}\n', encoding="utf-8")
    r = Recipe(min_width=8, min_height=8)
    res = build_training_set(str(src), tmp_path / "o1", recipe=r, captions=Captions(fallback=None))
    assert res.n_out == 1 and res.dropped[0]["stage"] == "caption"
    res = build_training_set(str(src), tmp_path / "o2", recipe=r,
                             captions=Captions(mode="template", trigger="T", template="{trigger}，第{index}张"))
    texts = [t for _, t in training_set.read_training_set(tmp_path / "o2")]
    assert texts == ["T，第0张", "T，第1张"]


def test_bad_recipe_and_source_values(tmp_path):
    with pytest.raises(ValueError, match="min_ratio"):
        Recipe(min_ratio=3, max_ratio=2).validate()
    with pytest.raises(ValueError, match="positive"):
        Recipe(min_width=0).validate()
    with pytest.raises(ValueError, match="aesthetics_model"):
        Recipe(aesthetics_model=str(tmp_path / "nope")).validate()
    with pytest.raises(DatasetError, match="neither a folder"):
        build_training_set("no_such_folder", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        build_training_set(str(tmp_path / "empty"), tmp_path / "o")


def test_modelscope_offline_is_a_clear_fast_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data_sources.SourceError, match="local folder"):
        data_sources.download_modelscope("AI-ModelScope/lowres_anime", tmp_path / "d")


def test_caption_editor_saves_atomically(synthetic_build, tmp_path):
    import shutil
    from kolors_course.data.caption_editor import caption_editor
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_build.folder, copy)
    ui = caption_editor(copy)
    before = training_set.read_training_set(copy)
    ui.pick.value = "00000.jpg"
    ui.text.value = "新的标注"          # what typing in the box does
    ui.button.click()                   # what the Save button does
    rows = training_set.read_training_set(copy)
    assert rows[0][1] == "新的标注" and len(rows) == synthetic_build.n_out
    assert rows[1:] == before[1:], "only the edited row changes"
    assert "saved 1 caption" in ui.status.value
    with pytest.raises(DatasetError, match="empty"):
        training_set.save_captions(copy, {"00001.jpg": "  "})
    assert training_set.read_training_set(copy)[0][1] == "新的标注"


# --- data-juicer's Ray executor -------------------------------------------------------
def test_ray_executor_without_a_cluster_says_how_to_start_one(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    src = data_sources.make_synthetic_source(tmp_path / "src", n=6)
    with pytest.raises(DatasetError, match="ray start --head"):
        build_training_set(str(src), tmp_path / "out", recipe=Recipe(min_width=48, min_height=48,
                                                                     executor="ray"))


@pytest.fixture
def local_ray(monkeypatch):
    import os
    ray_cli = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run([str(ray_cli), "start", "--head", "--num-cpus", "2", "--object-store-memory",
                            "200000000", "--disable-usage-stats"], env=env, capture_output=True, text=True,
                           timeout=180)
    if start.returncode != 0:
        pytest.skip(f"could not start a local Ray cluster: {start.stderr[-300:]}")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield
    import ray
    ray.shutdown()
    subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=180)


def test_same_recipe_on_a_local_ray_cluster(local_ray, tmp_path):
    src = data_sources.make_synthetic_source(tmp_path / "src", n=12)
    local = build_training_set(str(src), tmp_path / "local", recipe=SMALL)
    on_ray = build_training_set(str(src), tmp_path / "ray",
                                recipe=Recipe(min_width=48, min_height=48, min_size="1KB", executor="ray"))
    assert on_ray.n_out == local.n_out
    assert sorted((d["id"], d["stage"]) for d in on_ray.dropped) == \
        sorted((d["id"], d["stage"]) for d in local.dropped)
    assert (tmp_path / "ray" / "train" / "metadata.csv").read_text(encoding="utf-8") == \
        (tmp_path / "local" / "train" / "metadata.csv").read_text(encoding="utf-8")


# --- issue 8: what the metadata names, what is opened, and what the report counts ----------
import json  # noqa: E402
import os  # noqa: E402

# sys.addaudithook cannot be undone: the hook only records while this flag is set
_AUDIT = {"on": False, "opened": []}


def _record_opens(event, args):
    if _AUDIT["on"] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _AUDIT["opened"].append((os.fsdecode(args[0]), os.getcwd()))


_HOOKED = []


def _opened_during(fn):
    if not _HOOKED:
        sys.addaudithook(_record_opens)
        _HOOKED.append(True)
    _AUDIT["opened"] = []
    _AUDIT["on"] = True
    try:
        result = fn()
    finally:
        _AUDIT["on"] = False
    return result, {os.path.realpath(os.path.join(cwd, p)) for p, cwd in _AUDIT["opened"]}


def test_build_and_report_never_open_paths_the_metadata_points_outside(tmp_path):
    src = tmp_path / "src"
    _img(src / "ok.jpg", quality=95)
    outside = _img(tmp_path / "outside" / "secret.png")          # a real image: the report would draw it
    (src / "link.jpg").symlink_to(outside)                          # unlisted symlink out of the folder
    rows = ["ok.jpg", "../outside/secret.png", str(outside), "../../../../../../etc/passwd", "/etc/hostname",
            "link.jpg"]
    (src / "metadata.csv").write_text("file_name,text\n" + "".join(f"{r},说明\n" for r in rows),
                                      encoding="utf-8")
    out = tmp_path / "build" / "out"
    res, opened = _opened_during(lambda: build_training_set(str(src), out, recipe=Recipe(min_width=8,
                                                                                         min_height=8)))
    assert (out / "report" / "preview.png").is_file()        # the report (with its thumbnails) was drawn
    assert res.n_out == 1
    refused = {d["id"] for d in res.dropped if "outside the dataset folder" in d["reason"]}
    assert refused == set(rows) - {"ok.jpg"}
    forbidden = {str(outside.resolve()), "/etc/passwd", "/etc/hostname"}
    assert not opened & forbidden, f"opened outside the source folder: {opened & forbidden}"
    assert not [p for p in opened if p.startswith(str((tmp_path / "outside").resolve()))]


def test_data_juicer_style_metadata_jsonl_is_accepted(tmp_path):
    src = tmp_path / "src"
    _img(src / "images" / "a.jpg", quality=95)
    _img(src / "images" / "b.jpg", colour=(20, 200, 20), quality=95)
    (src / "metadata.jsonl").write_text(
        '{"images": ["images/a.jpg"], "text": "<__dj__image> 一只猫 <|__dj__eoc|>"}\n'
        '{"images": ["images/b.jpg"], "text": "一只狗"}\n', encoding="utf-8")
    res = build_training_set(str(src), tmp_path / "out", recipe=Recipe(min_width=8, min_height=8))
    assert res.n_out == 2 and not res.dropped
    assert sorted(t for _, t in training_set.read_training_set(tmp_path / "out")) == ["一只狗", "一只猫"]


@pytest.mark.parametrize("row, says", [
    ('{"images": ["a.jpg", "b.jpg"], "text": "两张"}', "2 images"),
    ('{"text": "没有图片"}', "neither"),
    ('{"images": [], "text": "空"}', "0 images"),
    ('{"file_name": 3, "text": "数字"}', "text"),
    ('["a.jpg", "列表"]', "JSON object"),
])
def test_metadata_jsonl_row_that_names_no_single_image_is_refused_clearly(tmp_path, row, says):
    src = tmp_path / "src"
    _img(src / "a.jpg", quality=95)
    _img(src / "b.jpg", quality=95)
    (src / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "好"}\n' + row + "\n",
                                        encoding="utf-8")
    with pytest.raises(data_sources.SourceError) as err:
        build_training_set(str(src), tmp_path / "out", recipe=Recipe(min_width=8, min_height=8))
    msg = str(err.value)
    assert str(src / "metadata.jsonl") in msg and "line 2" in msg and says in msg
    assert "file_name" in msg and '"images"' in msg            # the layouts it does accept
    assert not (tmp_path / "out").exists()


def test_images_not_listed_in_the_metadata_are_kept_and_counted(tmp_path):
    src = tmp_path / "src"
    _img(src / "a.jpg", quality=95)
    _img(src / "b.jpg", colour=(20, 20, 200), quality=95)
    _img(src / "more" / "c.png", colour=(20, 200, 20))
    (src / "metadata.csv").write_text("file_name,text\na.jpg,一只猫\n", encoding="utf-8")
    r = Recipe(min_width=8, min_height=8)
    res = build_training_set(str(src), tmp_path / "o1", recipe=r, captions=Captions(trigger="T"))
    assert res.n_out == 3
    kept = {k["id"]: k for k in res.report["kept"]}
    assert kept["a.jpg"]["caption"] == "T，一只猫"
    for name in ("b.jpg", "more/c.png"):
        assert "not listed in metadata" in kept[name]["notes"]
        assert "caption from template" in kept[name]["notes"] and "构图" in kept[name]["caption"]
    inp = res.report["input"]
    assert inp["unlisted_images"] == 2 and "kept" in inp["unlisted_decision"]
    # without a fallback caption they are dropped, with that reason, and still counted
    res = build_training_set(str(src), tmp_path / "o2", recipe=r, captions=Captions(fallback=None))
    assert res.n_out == 1
    assert {d["id"]: d["reason"] for d in res.dropped} == {
        "b.jpg": "not listed in metadata (and Captions(fallback=None) drops uncaptioned images)",
        "more/c.png": "not listed in metadata (and Captions(fallback=None) drops uncaptioned images)"}
    assert res.report["input"]["unlisted_images"] == 2
    assert "dropped" in res.report["input"]["unlisted_decision"]


def test_when_both_metadata_files_exist_the_choice_is_said_and_recorded(tmp_path, capsys):
    src = tmp_path / "src"
    _img(src / "a.jpg", quality=95)
    (src / "metadata.csv").write_text("file_name,text\na.jpg,来自csv\n", encoding="utf-8")
    (src / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "来自jsonl"}\n', encoding="utf-8")
    res = build_training_set(str(src), tmp_path / "out", recipe=Recipe(min_width=8, min_height=8))
    assert [t for _, t in training_set.read_training_set(tmp_path / "out")] == ["来自jsonl"]
    said = capsys.readouterr().out
    assert "metadata.jsonl" in said and "metadata.csv" in said and "ignor" in said
    inp = json.loads((tmp_path / "out" / "report" / "report.json").read_text(encoding="utf-8"))["input"]
    assert inp["metadata_file"] == "metadata.jsonl" and inp["ignored_metadata"] == ["metadata.csv"]
    assert res.report["input"] == inp


def test_metadata_rows_and_image_files_are_counted_apart(tmp_path):
    src = tmp_path / "src"
    _img(src / "a.jpg", quality=95)
    _img(src / "b.jpg", colour=(20, 20, 200), quality=95)
    (src / "metadata.csv").write_text("file_name,text\na.jpg,好\nb.jpg,好\ngone.jpg,没有\n../x.jpg,外面\n",
                                      encoding="utf-8")
    res = build_training_set(str(src), tmp_path / "out", recipe=Recipe(min_width=8, min_height=8))
    assert res.n_in == 2 and res.n_out == 2                 # two images, not four
    inp = res.report["input"]
    assert (inp["metadata_rows"], inp["rows_refused"], inp["rows_missing_file"], inp["image_files"]) == \
        (4, 1, 1, 2)
    assert "2 images in" in res.summary() and "4 metadata rows" in res.summary()


def test_shape_filter_reason_names_the_failing_side():
    r = Recipe(min_width=256, min_height=256)
    reason = dataset._reason("image_shape_filter", {"image_width": [2000], "image_height": [200]}, r)
    assert reason == "height 200 px < 256 px"
    reason = dataset._reason("image_shape_filter", {"image_width": [100], "image_height": [900]}, r)
    assert reason == "width 100 px < 256 px"
    reason = dataset._reason("image_shape_filter", {"image_width": [100], "image_height": [200]}, r)
    assert reason == "width 100 px < 256 px, height 200 px < 256 px"


def test_an_out_folder_inside_the_source_is_not_read_back_as_images(tmp_path):
    src = tmp_path / "src"
    _img(src / "a.jpg", quality=95)
    _img(src / "b.jpg", colour=(20, 20, 200), quality=95)
    (src / "metadata.csv").write_text("file_name,text\na.jpg,一只猫\nb.jpg,一只狗\n", encoding="utf-8")
    r = Recipe(min_width=8, min_height=8)
    build_training_set(str(src), src / "built", recipe=r)
    again = build_training_set(str(src), src / "built", recipe=r)    # built/train/*.jpg now lie in src
    assert again.n_in == 2 and again.report["input"]["unlisted_images"] == 0


def test_the_synthetic_set_is_the_tiny_world_in_the_look_only_the_lora_sees(tmp_path):
    """Notebook 02's tiny data set: world pictures in pastel (马卡龙色), never in the base palette,
    with the world's captions (the trigger word is added by the caption settings)."""
    import numpy as np

    from kolors_course.world.scenes import COLOURS, pastel, vocabulary

    src = data_sources.make_synthetic_source(tmp_path / "s", n=10, base=128)
    pastels = np.array([pastel(c) for c in COLOURS.values()], float)
    base = np.array(list(COLOURS.values()), float)
    for p in sorted(src.glob("img_*.jpg")):
        with Image.open(p) as im:
            corner = np.asarray(im.convert("RGB"), float)[2:8, 2:8].reshape(-1, 3).mean(0)
        assert np.abs(pastels - corner).sum(1).min() < np.abs(base - corner).sum(1).min(), p.name
        text = p.with_suffix(".txt").read_text(encoding="utf-8")
        assert any(w in text for w in vocabulary()), text


def test_the_synthetic_sources_greyscale_files_have_captions_true_of_them(tmp_path):
    """Files stored greyscale (to exercise the cleaning) show black-and-white scenes, so no caption
    names a colour the picture cannot have (they once named red, blue, ... on grey pictures)."""
    from PIL import Image

    from kolors_course.data.sources import make_synthetic_source
    from kolors_course.world.scenes import COLOURS, PAINTERS

    src = make_synthetic_source(tmp_path / "src", n=24, base=64)
    grey = 0
    for png in sorted(src.glob("img_*.png")):
        with Image.open(png) as im:
            if im.mode not in ("L", "I;16"):
                continue
        grey += 1
        text = png.with_suffix(".txt").read_text(encoding="utf-8")
        named = {c for c in COLOURS if c.removesuffix("色") in text}
        assert named <= {"白色", "黑色"}, (png.name, text)
        assert not any(p and p in text for p in PAINTERS), (png.name, text)
    assert grey >= 6


def test_template_captions_name_light_colours_by_their_hue():
    """The template's 色调 is the colour most pixels have, named by hue: light and muted colours
    keep their names (light green was named pink, light blue white: nearest saturated entry)."""
    from PIL import Image

    from kolors_course.data.clean import image_facts

    cases = {(167, 208, 170): "绿色调", (170, 200, 240): "蓝色调", (240, 230, 150): "黄色调",
             (200, 170, 230): "紫色调", (240, 180, 200): "粉色调", (220, 45, 45): "红色调",
             (128, 128, 128): "灰色调", (250, 250, 250): "白色调"}
    for rgb, name in cases.items():
        assert image_facts(Image.new("RGB", (64, 64), rgb))["color"] == name, rgb
    # a red shape on a large light-blue ground: the ground's colour, not the mean of the two
    img = Image.new("RGB", (64, 64), (170, 200, 240))
    img.paste((220, 45, 45), (24, 24, 40, 40))
    assert image_facts(img)["color"] == "蓝色调"


def test_a_folder_whose_template_captions_all_match_gets_a_note(tmp_path, capsys):
    src = tmp_path / "src"
    for i in range(4):     # four blue squares of other sizes (not duplicates of each other)
        _img(src / f"{i}.jpg", size=(64 + 8 * i, 64 + 8 * i), colour=(20, 20, 200 + 10 * i), quality=95)
    build_training_set(str(src), tmp_path / "o", recipe=Recipe(min_width=8, min_height=8),
                       captions=Captions(trigger="T"))
    out = capsys.readouterr().out
    assert "4 of the 4 captions made from the template are the same text" in out
    # different colours, different captions: no note
    src2 = tmp_path / "src2"
    for i, c in enumerate([(20, 20, 200), (20, 200, 20), (200, 20, 20), (240, 230, 150)]):
        _img(src2 / f"{i}.jpg", colour=c, quality=95)
    build_training_set(str(src2), tmp_path / "o2", recipe=Recipe(min_width=8, min_height=8),
                       captions=Captions(trigger="T"))
    assert "captions made from the template" not in capsys.readouterr().out


def test_preview_labels_break_between_words():
    from kolors_course.data.report import _wrap

    text = _wrap("odd_too_wide.png\nimage_aspect_ratio_filter: aspect ratio 3.0 is outside 0.5-2.0", 28)
    lines = text.splitlines()
    assert all(len(line) <= 28 for line in lines) and len(lines) <= 5
    words = "image_aspect_ratio_filter: aspect ratio 3.0 is outside 0.5-2.0".split()
    assert " ".join(lines[1:]).split() == words        # no word cut in two ("trunca ted")
