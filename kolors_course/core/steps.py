"""Helpers every notebook uses at its start and end."""
from __future__ import annotations

import json
import time
from pathlib import Path

from kolors_course.core.paths import project_path, relative_to_root


def step_dir(out_dir: str, step: str) -> Path:
    """``<out_dir>/<step>/``, created; ``out_dir`` is relative to the project root."""
    d = project_path(out_dir) / step
    d.mkdir(parents=True, exist_ok=True)
    return d


class StepSummary:
    """Collects what a notebook made and prints it as a short summary at the end.

    Made in a notebook's first cells (``summary = kc.StepSummary("01_text_to_image",
    out_dir)``): its clock starts then, so the time it reports counts the whole
    notebook, loading included.  ``summary.folder`` is the step's output folder.
    """

    def __init__(self, step: str, out_dir: str | Path):
        self.step = step
        self.folder = step_dir(out_dir, step)
        self.t0 = time.perf_counter()
        self.items: list[tuple[str, str]] = []

    def add(self, what: str, value) -> None:
        if isinstance(value, Path):
            value = relative_to_root(value)
        self.items.append((what, str(value)))

    def done(self) -> dict:
        secs = time.perf_counter() - self.t0
        self.items.append(("time", f"{secs:.1f} s"))
        width = max(len(k) for k, _ in self.items)
        print(f"== {self.step}: done ==")
        for k, v in self.items:
            print(f"  {k:<{width}}  {v}")
        data = dict(self.items)
        (self.folder / "summary.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
        return data


# --- the course's folder layout: the one place that spells it out ---------------------------
#: each notebook's output folder under ``out_dir``
STEP_FOLDERS = {"00": "00_setup", "01": "01_text_to_image", "02": "02_dataset", "03": "03_lora_training",
                "04": "04_story"}


def dataset_folder(out_dir) -> Path:
    """Where notebook 02 builds the training set (notebook 03 reads it from there)."""
    return project_path(out_dir) / STEP_FOLDERS["02"] / "dataset"


def lora_run_folder(out_dir, run_name: str) -> Path:
    """Notebook 03's run folder ``<out_dir>/03_lora_training/<run_name>``."""
    return project_path(out_dir) / STEP_FOLDERS["03"] / run_name


def lora_file(out_dir, run_name: str) -> Path:
    """The LoRA notebook 03 exports (DiffSynth layout), which notebook 04 loads."""
    return lora_run_folder(out_dir, run_name) / "lora.safetensors"


def kohya_lora_file(lora_path) -> Path:
    """The kohya/SDXL-layout copy notebook 03 writes beside ``lora_path`` (what ComfyUI loads)."""
    from kolors_course.lora.files import kohya_path

    return kohya_path(project_path(lora_path))


def gallery_file(out_dir) -> Path:
    """Notebook 04's gallery, which a class's index page links."""
    return project_path(out_dir) / STEP_FOLDERS["04"] / "gallery.html"
