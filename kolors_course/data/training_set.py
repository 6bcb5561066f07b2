"""The training set on disk: ``train/`` with ``00000.jpg ...`` and ``metadata.csv``
(``file_name,text``), the layout DiffSynth's trainers and this kit's read, and
``dataset.json`` (``MARKER``), which marks a folder the kit built.  Written by
``build.build_training_set``, read by the trainer, the report and the caption editor."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from kolors_course.core.paths import project_path

MARKER = "dataset.json"


class DatasetError(RuntimeError):
    """The data set cannot be built as asked; the message says what to change."""


def write_train(items, train: Path) -> None:
    """``train/00000.jpg ...`` and ``metadata.csv`` (file_name,text), the layout the trainer reads."""
    train.mkdir(parents=True)
    with (train / "metadata.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i, it in enumerate(items):
            name = f"{i:05d}.jpg"
            shutil.copyfile(it.file, train / name)
            w.writerow([name, it.caption])


def read_training_set(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a ``train/`` folder, checked."""
    folder = project_path(folder)
    train = folder / "train" if (folder / "train" / "metadata.csv").exists() else folder
    meta = train / "metadata.csv"
    if not meta.exists():
        raise DatasetError(f"no metadata.csv in {train}: build the training set first "
                           "(notebook 02_dataset)")
    from kolors_course.core.paths import inside

    rows = []
    with meta.open(encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            p = inside(train, r["file_name"])
            if not p.is_file():
                raise DatasetError(f"{meta} lists {r['file_name']}, which is missing")
            rows.append((p, r.get("text") or ""))
    if not rows:
        raise DatasetError(f"{meta} lists no images: the training set is empty")
    return rows


def save_captions(folder: str | os.PathLike, captions: dict[str, str]) -> Path:
    """Replace captions in ``train/metadata.csv`` (atomically); keys are file names."""
    rows = read_training_set(folder)
    meta = rows[0][0].parent / "metadata.csv"
    tmp = meta.with_suffix(".csv.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for p, text in rows:
            new = captions.get(p.name, text)
            if not str(new).strip():
                raise DatasetError(f"the caption for {p.name} would be empty")
            w.writerow([p.name, " ".join(str(new).split())])
    os.replace(tmp, meta)
    return meta
