"""Where raw training images come from: a local folder, a ModelScope data set,
or the kit's own synthetic set.  Every source ends up as a local folder of
image files plus optional captions, read by ``read_folder``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from kolors_course.core.paths import inside

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class SourceItem:
    id: str                      # stable name, the file's path relative to the folder
    path: Path | None            # None when the metadata pointed somewhere refused
    caption: str | None          # None: no caption found
    note: str = ""               # why the caption is missing, or why the path was refused


@dataclass
class SourceScan:
    """What ``scan_folder`` found: the items, and the facts the report needs to say
    what was read (metadata rows and image files are different things)."""
    folder: Path
    items: list
    metadata_file: str | None = None          # "metadata.jsonl", "metadata.csv", or None (.txt files)
    ignored_metadata: list = field(default_factory=list)
    unlisted: list = field(default_factory=list)   # ids of images in the folder the metadata omits
    notes: list = field(default_factory=list)


class SourceError(RuntimeError):
    """The source cannot be read at all (not a folder, offline hub...)."""


#: data-juicer's multimodal markers; the kit adds its own image token when it writes
#: data-juicer's input, so a caption copied from a data-juicer file must not keep them
_DJ_TOKENS = ("<__dj__image>", "<|__dj__eoc|>")

_EXPECTED = ('expected one image per row: {"file_name": "a.jpg", "text": "..."} '
             'or data-juicer\'s {"images": ["a.jpg"], "text": "..."}')

UNLISTED_NOTE = "not listed in metadata"


def _read_text(path: Path) -> tuple[str | None, str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, f"caption file {path.name} is not UTF-8 (re-save it as UTF-8)"
    text = " ".join(text.split())
    return (text or None), ("" if text else f"caption file {path.name} is empty")


def _caption(text) -> str | None:
    if text is None:
        return None
    text = str(text)
    for token in _DJ_TOKENS:
        text = text.replace(token, " ")
    return " ".join(text.split()) or None


def read_folder(folder: str | os.PathLike) -> list[SourceItem]:
    """Images under ``folder`` with their captions (see ``scan_folder``)."""
    return scan_folder(folder).items


def scan_folder(folder: str | os.PathLike, exclude=()) -> SourceScan:
    """Images under ``folder`` with captions from ``metadata.jsonl``, ``metadata.csv``
    or side-car ``.txt`` files, in that order of preference.

    Metadata rows name one image each: ``file_name`` (csv or jsonl) or, in
    jsonl, data-juicer's ``images`` list holding one path; the caption is
    ``text``.  When both metadata files exist ``metadata.jsonl`` is used and the
    scan's ``notes`` say so.  Images in the folder that the metadata does not
    list are kept without a caption (note ``UNLISTED_NOTE``), so the caption
    policy decides about them and the report counts them.

    Metadata paths are resolved inside ``folder``; one that points outside is
    kept as a refused item (never opened) so the report can say so.  Files
    under ``exclude`` (the kit's own output, when it lies inside the source)
    are not read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"{folder} is not a folder of images")
    scan = SourceScan(folder, [])
    items: dict[str, SourceItem] = {}
    meta_rows = _metadata_rows(folder, scan)
    if meta_rows is not None:
        listed = set()
        for name, text in meta_rows:
            try:
                p = inside(folder, name)
            except ValueError:
                items[name] = SourceItem(name, None, None, "path points outside the dataset folder: refused")
                continue
            listed.add(p)
            cap = _caption(text)
            items[name] = SourceItem(name, p, cap, "" if cap else "empty caption in metadata")
        for rel, real in _image_files(folder, exclude):
            if rel in items or real in listed:
                continue
            # not listed: kept uncaptioned so the caption policy (template or drop) decides,
            # rather than silently leaving out pictures the user put in the folder
            items[rel] = (SourceItem(rel, real, None, UNLISTED_NOTE) if real is not None else
                          SourceItem(rel, None, None, "symlink points outside the dataset folder: refused"))
            scan.unlisted.append(rel)
        scan.items = sorted(items.values(), key=lambda it: it.id)
        return scan
    for rel, real in _image_files(folder, exclude):
        if real is None:
            items[rel] = SourceItem(rel, None, None, "symlink points outside the dataset folder: refused")
            continue
        side = (folder / rel).with_suffix(".txt")
        if side.is_file():
            cap, note = _read_text(side)
        else:
            cap, note = None, "no caption file"
        items[rel] = SourceItem(rel, real, cap, note)
    scan.items = sorted(items.values(), key=lambda it: it.id)
    return scan


def _image_files(folder: Path, exclude=()):
    """(relative name, checked real path or None when a symlink leads outside) per image file."""
    base = folder.resolve()
    # an excluded folder that holds the source (the kit's synthetic set is drawn inside
    # its build folder) excludes nothing
    skip = [s for s in (Path(e).resolve() for e in exclude) if s != base and s not in base.parents]
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTS or not p.is_file() and not p.is_symlink():
            continue
        if any(s == p.resolve() or s in p.resolve().parents for s in skip):
            continue
        rel = str(p.relative_to(folder))
        try:
            yield rel, inside(folder, rel)
        except ValueError:
            yield rel, None


def _row_image(row, where: str) -> str:
    """The one image path a metadata row names, or a SourceError that says what is expected."""
    if not isinstance(row, dict):
        raise SourceError(f"{where} is not a JSON object; {_EXPECTED}")
    key = next((k for k in ("file_name", "images", "image", "path") if row.get(k) is not None), None)
    if key is None:
        raise SourceError(f"{where} has neither \"file_name\" nor \"images\"; {_EXPECTED}")
    value = row[key]
    if isinstance(value, list):
        # a training pair is one picture and its caption: several images in one row
        # (data-juicer's multi-image samples) have no single caption to train on
        if len(value) != 1:
            raise SourceError(f"{where} lists {len(value)} images in \"{key}\"; {_EXPECTED} "
                              "(split a multi-image row into one row per image)")
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise SourceError(f"{where}: \"{key}\" must be the image's path as text, not {value!r}; {_EXPECTED}")
    return value


def _metadata_rows(folder: Path, scan: SourceScan):
    jl, cs = folder / "metadata.jsonl", folder / "metadata.csv"
    if jl.is_file() and cs.is_file():
        scan.ignored_metadata.append(cs.name)
        scan.notes.append(f"{folder} holds both metadata.jsonl and metadata.csv: using metadata.jsonl "
                          "and ignoring metadata.csv (delete or rename the one you do not want)")
    if jl.is_file():
        scan.metadata_file = jl.name
        rows = []
        for n, line in enumerate(jl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{jl}: line {n} is not JSON ({exc.msg})") from exc
            name = _row_image(row, f"{jl}: line {n}")
            rows.append((name, row.get("text", row.get("caption"))))
        return rows
    if cs.is_file():
        scan.metadata_file = cs.name
        rows = []
        with cs.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                raise SourceError(f"{cs} needs a header with file_name (and text)")
            for r in reader:
                name = r["file_name"]
                if not isinstance(name, str) or not name.strip():
                    raise SourceError(f"{cs}: line {reader.line_num} has no file_name; "
                                      "each row is file_name,text with one image's path")
                rows.append((name, r.get("text")))
        return rows
    return None


# --- ModelScope -------------------------------------------------------------------
def download_modelscope(dataset_id: str, dest: Path, subset: str = "default", split: str = "train",
                        limit: int | None = None, cache_dir: Path | None = None) -> Path:
    """Save a ModelScope image data set as image files + ``metadata.jsonl`` in ``dest``."""
    from kolors_course.core.hub import hub_unreachable

    why = hub_unreachable()
    if why:
        raise SourceError(f"cannot download the ModelScope data set {dataset_id}: {why}. "
                          "Point `source` at a local folder of images, or use source='synthetic'.")
    from modelscope.msdatasets import MsDataset

    ds = MsDataset.load(dataset_id, subset_name=subset, split=split,
                        cache_dir=str(cache_dir) if cache_dir else None)
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        image = row.get("image") or row.get("image:FILE")
        if image is None:
            continue
        name = f"{i:06d}.png"
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image
            image = Image.open(image)
        image.save(dest / name)
        text = row.get("text") or row.get("caption")
        rows.append({"file_name": name, "text": text})
    with (dest / "metadata.jsonl").open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return dest


# --- synthetic ---------------------------------------------------------------------
def _draw(size, seed, lora_style: bool = True, grey: bool = False):
    """A picture of the tiny world (``kolors_course.world``) at ``size`` (w, h) and its caption.
    ``grey``: a white shape on black or a black one on white, no painter, for the files stored
    greyscale, so that their captions stay true of them.

    The scene is drawn square at the shorter side and centred on its background colour, so a
    centre crop (what LoRA training takes) gives the world's own picture back.  By default in
    the LoRA lesson's look (pastel, "马卡龙色"), which the tiny base model never saw, with one of
    the world's varied captions (no trigger word: the caption settings add it).
    """
    from PIL import Image

    from kolors_course.world.scenes import caption, random_scene, render, scene_colours

    rng = random.Random(f"synthetic:{seed}")
    scene = random_scene(rng)
    if grey:
        import dataclasses

        shape_colour, background = rng.sample(["白色", "黑色"], 2)
        scene = dataclasses.replace(scene, colour=shape_colour, background=background, painter="")
    w, h = size
    side = min(w, h)
    square = render(scene, size=side, seed=seed, lora_style=lora_style)
    _, bg = scene_colours(scene, lora_style=lora_style)
    img = Image.new("RGB", (w, h), tuple(bg))
    img.paste(square, ((w - side) // 2, (h - side) // 2))
    # a faint grain, as photos have: flat colours alone compress below the recipe's 1 KB
    # minimum, which is meant for nearly blank pictures
    import numpy as np

    grain = np.random.default_rng(seed).normal(0, 4, (h, w, 1))
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))
    text = caption(scene, rng)
    return img, text or caption(scene, random.Random(f"synthetic-again:{seed}")) or "一张图"


def make_synthetic_source(dest: str | os.PathLike, n: int = 24, seed: int = 0, base: int = 64) -> Path:
    """A deterministic folder of images with side-car captions, including bad items.

    Good images vary in size, aspect ratio and colour mode (RGB, RGBA, palette,
    greyscale, CMYK, 16-bit, EXIF-rotated).  Deliberately bad ones: a zero-byte
    file, a truncated JPEG, a text file named .png, a too-small image, an
    extreme aspect ratio, a nearly blank image (tiny file), a duplicate, a
    missing, an empty and a non-UTF-8 caption.
    """
    from PIL import Image

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    sizes = [(base, base), (base * 3 // 2, base), (base, base * 3 // 2), (base * 5 // 4, base * 5 // 4),
             (base * 2, base * 3 // 2)]
    modes = ["RGB", "RGBA", "P", "L", "CMYK", "I;16", "EXIF"]
    made = []

    def save(name, img, caption, fmt=None, **kw):
        img.save(dest / name, fmt, **kw)
        if caption is not None:
            (dest / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
        made.append(name)

    for i in range(n):
        size = sizes[i % len(sizes)]
        mode = modes[i % len(modes)]
        # the files stored greyscale show a black-and-white scene: a colour caption on a grey
        # picture would teach the LoRA a caption that lies
        img, cap = _draw(size, seed * 1000 + i, grey=mode in ("L", "I;16"))
        stem = f"img_{i:03d}"
        if mode == "RGB":
            save(f"{stem}.jpg", img, cap, quality=92)
        elif mode == "RGBA":
            rgba = img.convert("RGBA")
            rgba.putalpha(Image.new("L", size, 200))
            save(f"{stem}.png", rgba, cap)
        elif mode == "P":
            save(f"{stem}.gif", img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), cap)
        elif mode == "L":
            save(f"{stem}.png", img.convert("L"), cap)
        elif mode == "CMYK":
            save(f"{stem}.jpg", img.convert("CMYK"), cap, quality=92)
        elif mode == "I;16":
            import numpy as np
            arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257)
            save(f"{stem}.png", Image.fromarray(arr.astype("<u2")), cap)
        else:  # stored rotated, with an EXIF orientation tag that undoes it
            exif = Image.Exif()
            exif[0x0112] = 6
            save(f"{stem}.jpg", img.rotate(90, expand=True), cap, exif=exif, quality=92)
    # deliberately bad or odd items
    (dest / "bad_empty.jpg").write_bytes(b"")
    (dest / "bad_empty.txt").write_text("一个空文件", encoding="utf-8")
    good, _ = _draw((base, base), seed + 7)
    buf = io.BytesIO()
    good.save(buf, "JPEG", quality=92)
    (dest / "bad_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (dest / "bad_truncated.txt").write_text("一个截断的文件", encoding="utf-8")
    (dest / "bad_not_image.png").write_text("this is not a picture", encoding="utf-8")
    small, cap = _draw((base // 3, base // 3), seed + 8)
    save("odd_too_small.png", small, cap)
    wide, cap = _draw((base * 3, base - 8), seed + 9)
    save("odd_too_wide.png", wide, cap)
    blank = Image.new("RGB", (base, base), (128, 128, 128))
    save("odd_blank.jpg", blank, "一张灰色的空白图", quality=50)
    first = sorted(p for p in made if p.startswith("img_"))[0]
    (dest / "odd_duplicate.jpg").write_bytes((dest / first).read_bytes())
    (dest / "odd_duplicate.txt").write_text("重复的图片", encoding="utf-8")
    nocap, _ = _draw((base, base), seed + 10)
    nocap.save(dest / "odd_no_caption.jpg", quality=92)
    emptycap, _ = _draw((base, base), seed + 11)
    save("odd_empty_caption.jpg", emptycap, "   ", quality=92)
    gbk, cap = _draw((base, base), seed + 12)
    gbk.save(dest / "odd_gbk_caption.jpg", quality=92)
    (dest / "odd_gbk_caption.txt").write_bytes(cap.encode("gbk"))
    return dest
