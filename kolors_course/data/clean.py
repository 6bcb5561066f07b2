"""Decode, check and normalise every source image before data-juicer sees it.

data-juicer drops a whole batch when one file cannot be read, and reports the
run as a success; so every image is opened here first, and either converted to
a plain RGB JPEG or dropped with a stated reason.
"""
from __future__ import annotations

import hashlib
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from kolors_course.core.state import pillow_strict_decoding
from kolors_course.data.sources import SourceItem

#: Pillow's own limit (about 89 megapixels) stays in force: a bigger image is dropped
JPEG_QUALITY = 95


@dataclass
class CleanItem:
    id: str
    source: str
    file: Path           # the normalised RGB JPEG
    caption: str | None
    width: int
    height: int
    notes: list
    facts: dict | None = None


@dataclass
class Dropped:
    id: str
    source: str
    stage: str           # "decode", "caption", "duplicate", or a data-juicer filter name
    reason: str


def dropped_by_stage(dropped) -> dict[str, int]:
    """How many images each stage dropped, in the order the stages first dropped one
    (``Dropped`` objects or their dicts, as ``report.json`` stores them)."""
    out: dict[str, int] = {}
    for d in dropped:
        stage = d["stage"] if isinstance(d, dict) else d.stage
        out[stage] = out.get(stage, 0) + 1
    return out


#: hue bands (degrees, start of each band) and their names; the eight colours of the tiny world
#: (kolors_course.world.scenes.COLOURS) fall inside their own band
_HUE_BANDS = ((15, "橙色"), (42, "黄色"), (70, "绿色"), (170, "蓝色"), (255, "紫色"), (290, "粉色"), (345, "红色"))


def tone_names(rgb) -> "np.ndarray":
    """The colour name of each RGB value (an N x 3 array): by hue, so that a light or muted colour
    keeps its name (light green is 绿色, not the nearest saturated palette entry, which was pink);
    white, grey and black by brightness where there is little colour; light red is 粉色 and dark
    orange or red 棕色."""
    import numpy as np

    x = np.asarray(rgb, dtype=np.float32).reshape(-1, 3) / 255.0
    hi, lo = x.max(axis=1), x.min(axis=1)
    chroma = hi - lo
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    hue = np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    names = np.full(len(x), "红色", dtype=object)           # hue 345-360 and 0-15
    for start, name in _HUE_BANDS[:-1]:
        names[hue >= start] = name
    names[hue >= _HUE_BANDS[-1][0]] = "红色"
    sat = chroma / np.maximum(hi, 1e-6)
    warm = np.isin(names, ("红色", "橙色"))
    names[(names == "红色") & (sat < 0.5) & (hi > 0.75)] = "粉色"
    names[warm & (hi < 0.55)] = "棕色"
    grey = (sat < 0.15) | (chroma < 0.08)
    names[grey] = np.where(hi[grey] > 0.78, "白色", np.where(hi[grey] < 0.25, "黑色", "灰色"))
    return names


def image_facts(img) -> dict:
    """Orientation and dominant colour (the name most pixels have), in Chinese, for caption templates."""
    w, h = img.size
    orientation = "横构图" if w > h * 1.1 else "竖构图" if h > w * 1.1 else "方构图"
    factor = max(1, min(w, h) // 32)
    small = img.convert("RGB").reduce(factor) if factor > 1 else img.convert("RGB")
    import numpy as np

    # from the raw RGB bytes (Image.getdata is deprecated in Pillow 12)
    names, counts = np.unique(tone_names(np.frombuffer(small.tobytes(), dtype=np.uint8)), return_counts=True)
    colour = str(names[int(np.argmax(counts))])
    return {"orientation": orientation, "color": f"{colour[:-1]}色调"}     # 红色 -> 红色调


def to_rgb(img):
    """Any Pillow mode to RGB: transparency over white, 16-bit scaled to 8-bit, CMYK converted."""
    from PIL import Image

    notes = []
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype("uint8"))
        notes.append(f"{mode} scaled to 8 bits")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("palette converted")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
        notes.append("transparency flattened on white")
    if img.mode == "CMYK":
        notes.append("CMYK converted")
    if img.mode == "L":
        notes.append("greyscale converted")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, notes


def decode(path: Path):
    """Open, fully decode and orient one image; raises ValueError with a plain reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.exists():
        raise ValueError("file not found")
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    # strict: a truncated file must fail here, whatever data-juicer set for the process
    with pillow_strict_decoding(), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
            try:
                im.load()    # decodes everything: truncation shows up here
                fmt = im.format
                needs_turn = im.getexif().get(0x0112, 1) not in (0, 1)
                oriented = ImageOps.exif_transpose(im) if needs_turn else None
                rotated = oriented is not None and oriented.size != im.size
                img = oriented if oriented is not None else im
                if getattr(im, "n_frames", 1) > 1:   # keep only the first frame, close the file
                    img = img.copy()
                img.format = fmt
            finally:
                if getattr(im, "fp", None) is not None and getattr(im, "n_frames", 1) > 1:
                    im.close()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"too many pixels, past Pillow's decompression-bomb limit ({exc})") from None
        except UnidentifiedImageError:
            raise ValueError("not an image (Pillow cannot identify the file)") from None
        except (OSError, SyntaxError) as exc:
            raise ValueError(f"truncated or corrupt image ({exc})") from None
    return img, (["EXIF rotation applied"] if rotated else [])


def normalise(items: list[SourceItem], out_dir: Path, progress=None):
    """Write each good image as ``out_dir/<n>.jpg`` (RGB); return (kept, dropped)."""

    out_dir.mkdir(parents=True, exist_ok=True)
    kept: list[CleanItem] = []
    dropped: list[Dropped] = []
    seen: dict[str, str] = {}
    iterator = progress(items, desc="checking images") if progress else items
    for item in iterator:
        if item.path is None:
            dropped.append(Dropped(item.id, item.id, "decode", item.note))
            continue
        try:
            img, notes = decode(item.path)
        except ValueError as exc:
            dropped.append(Dropped(item.id, item.id, "decode", str(exc)))
            continue
        untouched = img.format == "JPEG" and img.mode == "RGB" and not notes
        img, more = to_rgb(img)
        notes += more
        # the file's bytes, not its pixels: ~40x less to hash, and copies are the usual duplicates
        digest = hashlib.blake2b(item.path.read_bytes(), digest_size=16).hexdigest()
        if digest in seen:
            dropped.append(Dropped(item.id, item.id, "duplicate", f"same file content as {seen[digest]}"))
            continue
        seen[digest] = item.id
        if item.note:
            notes.append(item.note)
        target = out_dir / f"{len(kept):05d}.jpg"
        if untouched:   # already an upright RGB JPEG: copy the bytes, no second compression
            shutil.copyfile(item.path, target)
        else:
            img.save(target, "JPEG", quality=JPEG_QUALITY)
        kept.append(CleanItem(item.id, item.id, target, item.caption, img.width, img.height, notes,
                              image_facts(img)))
    return kept, dropped
