"""Reference-image conditions: what each one shows, and every bad input gets a clear message."""
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kolors_course.control import conditions as C


def _reference(size=(128, 128), mode="RGB"):
    """A red disc on blue, the left half of the picture."""
    img = Image.new("RGB", size, (40, 80, 220))
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse((w // 8, h // 4, w // 2, 3 * h // 4), fill=(220, 40, 40))
    return img.convert(mode) if mode != "RGB" else img


def test_canny_edges_lie_on_the_outline_and_follow_the_thresholds():
    ref = _reference()
    edges = np.asarray(C.canny(ref))[..., 0] > 0
    assert edges.any()
    # every edge pixel is next to a colour change of the reference
    arr = np.asarray(ref).astype(int)
    change = np.zeros(edges.shape, bool)
    change[:, 1:] |= np.abs(np.diff(arr, axis=1)).sum(-1) > 30
    change[1:, :] |= np.abs(np.diff(arr, axis=0)).sum(-1) > 30
    near = np.zeros_like(change)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(change, dy, 0), dx, 1)
    assert near[edges].mean() > 0.95
    # a threshold above every gradient finds nothing
    assert not (np.asarray(C.canny(ref, low=2500, high=3000)) > 0).any()
    assert (np.asarray(C.canny(ref, low=50, high=100)) > 0).sum() >= edges.sum()
    with pytest.raises(ValueError, match="low < high"):
        C.canny(ref, low=200, high=100)


def test_colour_map_keeps_where_each_colour_is():
    ref = _reference()
    cmap = np.asarray(C.colour(ref, cells=8)).astype(int)
    assert cmap.shape == (128, 128, 3)
    left, right = cmap[64, 40], cmap[64, 120]
    assert left[0] > left[2], "the red disc's cells stay red"
    assert right[2] > right[0], "the background's cells stay blue"
    assert len(np.unique(cmap.reshape(-1, 3), axis=0)) <= 64, "a coarse layout, not the picture"


def test_bad_references_get_a_clear_message(tmp_path):
    with pytest.raises(C.ReferenceImageError, match="file not found"):
        C.load_reference(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(C.ReferenceImageError, match="empty"):
        C.load_reference(tmp_path / "empty.png")
    buf = io.BytesIO()
    _reference().save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(C.ReferenceImageError, match="truncated or corrupt"):
        C.load_reference(tmp_path / "cut.jpg")
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(C.ReferenceImageError, match="not an image"):
        C.load_reference(tmp_path / "text.png")
    with pytest.raises(C.ReferenceImageError, match="too small"):
        C.load_reference(_reference((32, 32)))
    with pytest.raises(C.ReferenceImageError, match="4:1"):
        C.load_reference(_reference((640, 64)))
    with pytest.raises(C.ReferenceImageError, match="multiple of 64"):
        C.load_reference(_reference(), width=100, height=128)
    with pytest.raises(ValueError, match="unknown condition"):
        C.extract_condition(_reference(), "sketch")


def test_greyscale_and_transparent_references_are_converted_and_said_so(tmp_path):
    grey, notes = C.load_reference(_reference(mode="L"))
    assert grey.mode == "RGB" and "greyscale converted" in notes
    rgba = _reference().convert("RGBA")
    rgba.putalpha(0)                                    # fully transparent: white, as a ControlNet sees it
    rgba.save(tmp_path / "clear.png")
    flat, notes = C.load_reference(tmp_path / "clear.png", width=64, height=128)
    assert flat.size == (64, 128) and np.asarray(flat).min() == 255
    assert "transparency flattened on white" in notes and any("resized to 64x128" in n for n in notes)


def test_annotator_conditions_offline_say_what_to_install_or_download(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("KOLORS_COURSE_ANNOTATORS", str(tmp_path / "Annotators"))
    for name in ("depth", "pose", "softedge"):
        with pytest.raises(C.ConditionUnavailable) as info:
            C.extract_condition(_reference(), name)
        text = str(info.value)
        if importlib.util.find_spec("controlnet_aux") is None:
            assert "pip install controlnet-aux" in text
        else:
            assert "Annotators" in text and str(tmp_path / "Annotators") in text


def test_condition_grid_shows_what_runs_and_explains_the_rest(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KOLORS_COURSE_ANNOTATORS", str(tmp_path / "none"))
    fig, made, why = C.condition_grid(_reference(), save_to=tmp_path / "grid.png")
    assert made["canny"] is not None and made["colour"] is not None
    assert set(why) == {"depth", "pose", "softedge"}
    assert (tmp_path / "grid.png").stat().st_size > 1000 and len(fig.axes) == 6
    out = capsys.readouterr().out
    assert "depth, pose, softedge:" in out or all(f"{n}:" in out for n in ("depth", "pose", "softedge"))
