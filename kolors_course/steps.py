"""Helpers every notebook uses at its start and end."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .paths import project_path, relative_to_root


_STARTED: dict[str, float] = {}


def step_dir(out_dir: str, step: str) -> Path:
    """``<out_dir>/<step>/``, created; ``out_dir`` is relative to the project root.
    Also starts the clock that the step's summary reports."""
    d = project_path(out_dir) / step
    d.mkdir(parents=True, exist_ok=True)
    _STARTED.setdefault(step, time.perf_counter())
    return d


class StepSummary:
    """Collects what a notebook made and prints it as a short summary at the end."""

    def __init__(self, step: str, folder: Path):
        self.step, self.folder = step, Path(folder)
        self.t0 = _STARTED.pop(step, time.perf_counter())
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
