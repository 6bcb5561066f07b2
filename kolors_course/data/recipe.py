"""The data-juicer filter recipe: built from parameters, written as YAML, run by
data-juicer's own executor, and checked so that nothing fails silently.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from kolors_course.core.state import (environ, environ_default, loguru_disabled, loguru_handlers_scoped,
                                       working_directory)


class FilterError(RuntimeError):
    """data-juicer failed, lost samples, or kept nothing."""


@dataclass
class Recipe:
    """What to keep.  ``None`` switches a filter off.

    - ``min_width``/``min_height``: data-juicer ``image_shape_filter``;
    - ``min_ratio``/``max_ratio`` (width / height): ``image_aspect_ratio_filter``;
    - ``min_size``/``max_size`` (file size, e.g. "2KB", "20MB"): ``image_size_filter``;
    - ``aesthetics_model``: a local folder of an aesthetics predictor for
      ``image_aesthetics_filter`` (model-based filters need their model on disk;
      nothing is downloaded behind your back), with ``min_aesthetics``.
    """
    min_width: int | None = 1024
    min_height: int | None = 1024
    min_ratio: float | None = 0.5
    max_ratio: float | None = 2.0
    min_size: str | None = None
    max_size: str | None = None
    aesthetics_model: str | None = None
    min_aesthetics: float = 0.4
    np: int = 1                     # data-juicer worker processes
    executor: str = "default"       # "default" (local processes) or "ray"

    def validate(self) -> None:
        for name in ("min_width", "min_height"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r}: use a positive number of pixels, or None")
        if self.min_ratio is not None and self.max_ratio is not None and self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio {self.min_ratio} is above max_ratio {self.max_ratio}")
        if self.executor not in ("default", "ray"):
            raise ValueError("executor must be 'default' or 'ray'")
        if self.aesthetics_model and not Path(self.aesthetics_model).is_dir():
            raise ValueError(f"aesthetics_model {self.aesthetics_model!r} is not a local folder: "
                             "download the predictor first, or set it to None")

    def ops(self) -> list[dict]:
        ops = self._ops()
        # data-juicer picks 2+ worker processes per op by itself, and `datasets` 5
        # starts a worker pool even for num_proc=1; num_proc=0 (with data-juicer's
        # auto parallelism off) runs in this process, which for image filters that
        # only read headers is several times faster (bench/run.py dataset)
        if self.executor == "ray":     # Ray sizes its own actors and tasks
            return ops
        for op in ops:
            args = next(iter(op.values()))
            args["num_proc"] = 0 if self.np <= 1 else self.np
            args["auto_op_parallelism"] = False
        return ops

    def _ops(self) -> list[dict]:
        ops = []
        if self.min_width is not None or self.min_height is not None:
            ops.append({"image_shape_filter": {"min_width": self.min_width or 1,
                                               "min_height": self.min_height or 1,
                                               "any_or_all": "any"}})
        if self.min_ratio is not None or self.max_ratio is not None:
            ops.append({"image_aspect_ratio_filter": {"min_ratio": self.min_ratio or 0.0,
                                                      "max_ratio": self.max_ratio or 1e9,
                                                      "any_or_all": "any"}})
        if self.min_size or self.max_size:
            ops.append({"image_size_filter": {"min_size": self.min_size or "0",
                                              "max_size": self.max_size or "1TB",
                                              "any_or_all": "any"}})
        if self.aesthetics_model:
            ops.append({"image_aesthetics_filter": {"hf_scorer_model": self.aesthetics_model,
                                                    "min_score": self.min_aesthetics,
                                                    "any_or_all": "any"}})
        return ops

    def config(self, dataset_path: str, export_path: str, work_dir: str, n_samples: int) -> dict:
        """A data-juicer config (the same keys ``dj-process --config`` reads)."""
        return {
            "project_name": "kolors-course-dataset",
            "dataset_path": dataset_path,
            "export_path": export_path,
            "work_dir": work_dir,
            "executor_type": self.executor,
            "np": self.np,
            "text_keys": "text",
            "image_key": "images",
            # fail loudly: the default (True) logs an op's error and drops the batch
            "skip_op_error": False,
            # the tracer writes every sample each filter removed, with its stats
            "open_tracer": True,
            "trace_num": max(n_samples, 1),
            "use_cache": False,
            "keep_stats_in_res_ds": True,
            "process": self.ops(),
        }


def write_recipe_yaml(recipe: Recipe, folder: Path, n_samples: int) -> Path:
    """``recipe.yaml`` with paths relative to ``folder``: run it there with
    ``cd <folder> && dj-process --config recipe.yaml``."""
    cfg = recipe.config("dj_input.jsonl", "dj_output/kept.jsonl", "dj_work", n_samples)
    path = folder / "recipe.yaml"
    header = ("# data-juicer recipe written by kolors_course.\n"
              "# Re-run by hand with:  cd <this folder> && dj-process --config recipe.yaml\n")
    path.write_text(header + yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def write_dj_input(items, path: Path, base: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for it in items:
            row = {"id": it.id, "images": [os.path.relpath(it.file, base)],
                   "text": f"<__dj__image> {it.caption or ''}".strip()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_recipe(folder: Path, recipe: Recipe, n_samples: int, verbose: bool = False) -> dict:
    """Run ``folder/recipe.yaml`` through data-juicer; return kept ids and per-filter drops.

    Returns ``{"kept": {id: stats}, "dropped": {op_name: [(id, stats), ...]}}``.
    """
    folder = Path(folder).resolve()
    # datasets pings the hub on load unless HF_HUB_OFFLINE is set (a learner's own value wins);
    # data-juicer marks Ray mode in RAY_JOB and never clears it, which would break a later
    # local run in the same kernel; the YAML holds paths relative to its folder
    with environ_default(HF_HUB_OFFLINE="1"), environ(RAY_JOB="1" if recipe.executor == "ray" else "0"), \
            working_directory(folder), _quiet_dj(verbose), _library_bars_off(), loguru_handlers_scoped():
        from data_juicer.config import init_configs
        from data_juicer.core import DefaultExecutor

        try:
            # absolute paths for this run: Ray actors do not share our working directory
            cfg = init_configs(["--config", "recipe.yaml",
                                "--dataset_path", str(folder / "dj_input.jsonl"),
                                "--export_path", str(folder / "dj_output" / "kept.jsonl"),
                                "--work_dir", str(folder / "dj_work")])
            if recipe.executor == "ray":
                from data_juicer.core.executor.ray_executor import RayExecutor
                executor = RayExecutor(cfg)
            else:
                executor = DefaultExecutor(cfg)
            executor.run()
        except Exception as exc:
            if recipe.executor == "ray" and type(exc).__name__ == "ConnectionError":
                raise FilterError("executor='ray' needs a running Ray cluster: start one with "
                                  "`ray start --head` (or set RAY_ADDRESS), or use executor='default'") from exc
            op = _failing_op(exc, recipe)
            raise FilterError(f"data-juicer failed in {op}: {type(exc).__name__}: {str(exc)[:400]}\n"
                              f"Its logs are in {folder / 'dj_work'}.") from exc
    kept = _read_jsonl(folder / "dj_output" / "kept.jsonl")
    stats = _read_jsonl(folder / "dj_output" / "kept_stats.jsonl")
    kept_ids = {row["id"]: row.get("__dj__stats__") or
                (stats[i].get("__dj__stats__", {}) if i < len(stats) else {}) for i, row in enumerate(kept)}
    dropped = {}
    for op in recipe.ops():
        name = next(iter(op))
        dropped[name] = []
        for trace in (folder / "dj_work").glob(f"**/trace/sample_trace-{name}.jsonl"):
            for row in _read_jsonl(trace):
                dropped[name].append((row["id"], row.get("__dj__stats__", {})))
    n_dropped = sum(len(v) for v in dropped.values())
    if len(kept_ids) + n_dropped != n_samples:
        raise FilterError(
            f"data-juicer kept {len(kept_ids)} and its filters report {n_dropped} removed, but "
            f"{n_samples} went in: {n_samples - len(kept_ids) - n_dropped} samples vanished without a "
            f"reason (a batch that failed to load?). Logs: {folder / 'dj_work'}")
    return {"kept": kept_ids, "dropped": dropped}


@contextlib.contextmanager
def _library_bars_off():
    """No progress bars from ``datasets`` (which data-juicer drives) during the run.

    In a notebook they are ipywidgets: one per op and phase, whose state a
    notebook saved from Jupyter does not keep, so they reopen as broken widgets.
    The kit reports what each filter kept and dropped instead.  The previous
    setting is restored afterwards, so a learner's own ``datasets`` code keeps
    its bars."""
    import importlib

    ds_tqdm = importlib.import_module("datasets.utils.tqdm")   # the module, not its tqdm class

    # HF_DATASETS_DISABLE_PROGRESS_BARS=0 in the environment: the learner asked for the bars
    turn_off = not ds_tqdm.are_progress_bars_disabled() and ds_tqdm.HF_DATASETS_DISABLE_PROGRESS_BARS is not False
    if turn_off:
        ds_tqdm.disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            ds_tqdm.enable_progress_bars()


@contextlib.contextmanager
def _quiet_dj(verbose: bool):
    """data-juicer logs every op and prints its config table; keep that for ``verbose``.
    Errors are unaffected: with ``skip_op_error: False`` they raise."""
    if verbose:
        yield
        return
    sink = io.StringIO()
    with loguru_disabled("data_juicer"), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def _failing_op(exc: Exception, recipe: Recipe) -> str:
    text = repr(exc) + "".join(str(a) for a in getattr(exc, "args", ()))
    for op in recipe.ops():
        name = next(iter(op))
        if name in text:
            return f"the filter {name}"
    return "one of the filters (" + ", ".join(next(iter(o)) for o in recipe.ops()) + ")"


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file, or of every JSON(L) shard in a folder (the Ray exporter writes one)."""
    if not path.exists():
        return []
    files = sorted(p for p in path.rglob("*.json*") if p.is_file()) if path.is_dir() else [path]
    rows = []
    for f in files:
        rows += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def recipe_dict(recipe: Recipe) -> dict:
    return asdict(recipe)
