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
