"""Checkpoints, resume and the run folder.

A checkpoint is ``checkpoints/step-NNNNNN/``: ``lora.safetensors`` (peft's adapter weights,
with rank/alpha metadata, so an earlier step loads at its trained strength) and
``state.pt`` (optimizer, learning-rate schedule, the run's own random generator, the
sample stream's position, the losses so far, the settings and the data fingerprint),
written in a ``.tmp`` folder and renamed into place.

Why not accelerate's ``save_state``/``load_state``: they save every prepared model whole
(the 2.6 B-parameter UNet, 5 GB a checkpoint, unless hooks strip it), and ``load_state``
unpickles the RNG and custom states with ``weights_only=False``, so resuming from a
checkpoint folder someone shared would run arbitrary code.  ``state.pt`` holds tensors,
numbers and strings only and is read with ``weights_only=True``.  The optimizer and
schedule states are the ones accelerate wraps (``state_dict``/``load_state_dict``), and
the adapter weights go through peft's ``get_peft_model_state_dict`` /
``set_peft_model_state_dict``."""
from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kolors_course.core.paths import project_path, relative_to_root
from kolors_course.lora.adapters import all_finite, load_lora_state, lora_state

#: how a message tells a learner to train a run again from scratch: train_lora's argument, and the
#: notebook 03 parameter that sets it
FRESH_RUN = "overwrite=True (notebook 03: retrain = True)"
from kolors_course.lora.config import TrainConfig, TrainResult, TrainingError, changed_settings, config_record
from kolors_course.lora.data import dataset_fingerprint


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()
                  and not p.name.endswith(".tmp") and (p / "state.pt").exists())


@dataclass
class RunState:
    """Everything a checkpoint restores besides the model and optimizer: where the run is."""
    step: int = 0
    losses: list = field(default_factory=list)
    fixed_loss_before: float | None = None
    resumed_from: int | None = None
    fixed_losses: list = field(default_factory=list)     # (step, loss on the fixed set): 0 and each checkpoint


def save_checkpoint(run_dir: Path, state: RunState, unet, optimizer, lr_schedule, gen, stream,
                    cfg: TrainConfig, meta: dict, dataset: str) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, then drop all but the last ``cfg.keep_last``.

    The LoRA inside carries the same metadata as an exported one (rank, alpha), so
    loading a checkpoint to look at an earlier step uses the trained strength.
    """
    from kolors_course.lora.files import lora_pairs_from_peft, save_diffsynth_lora

    weights = lora_state(unet)
    if not all_finite(weights.values()):
        # a NaN/inf weight must never become "the last good checkpoint"
        raise TrainingError(f"the LoRA weights became NaN or infinite by step {state.step}: training diverged. "
                            f"Lower learning_rate (now {cfg.learning_rate}), e.g. to {cfg.learning_rate / 10:g}.")
    final = run_dir / "checkpoints" / f"step-{state.step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_diffsynth_lora(lora_pairs_from_peft(weights), tmp / "lora.safetensors",
                        dict(meta, checkpoint_step=str(state.step)))
    torch.save({"step": state.step, "optimizer": optimizer.state_dict(), "scheduler": lr_schedule.state_dict(),
                "generator": gen.get_state(), "cursor": stream.cursor, "losses": list(state.losses),
                "fixed_loss_before": state.fixed_loss_before, "fixed_losses": [list(x) for x in state.fixed_losses],
                "config": json.dumps(config_record(cfg)),
                "dataset": dataset},
               tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-cfg.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(ckpt: Path) -> dict:
    """A checkpoint's state (our own file, loaded without unpickling arbitrary objects)."""
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


def check_resumable(ckpt: Path, state: dict, cfg: TrainConfig, dataset: str) -> None:
    """Refuse a resume that would silently train with other settings or data than recorded."""
    problems = []
    if "config" in state:
        problems += changed_settings(json.loads(state["config"]), cfg)
    if state.get("dataset") not in (None, dataset):
        problems.append("the training set changed (captions, files or sizes) since the checkpoint")
    if problems:
        raise TrainingError(
            f"{relative_to_root(ckpt)} was trained with other settings, so resuming would not continue "
            "the same run:\n  - " + "\n  - ".join(problems) +
            "\nUse the checkpoint's settings to resume, or start a fresh run (another run_name, or "
            f"{FRESH_RUN}).")


def load_checkpoint(ckpt: Path, state: dict, unet, optimizer, lr_schedule, gen, stream) -> RunState:
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "lora.safetensors"))
    if not all_finite(weights.values()):
        raise TrainingError(f"{relative_to_root(ckpt)} holds NaN or infinite weights (written by an older "
                            "version before a divergence): delete it and run again")
    load_lora_state(unet, weights)
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    stream.cursor = state["cursor"]
    return RunState(step=state["step"], losses=list(state["losses"]),
                    fixed_loss_before=state.get("fixed_loss_before"), resumed_from=state["step"],
                    fixed_losses=[tuple(x) for x in state.get("fixed_losses", [])])


def run_finished(run_dir: Path) -> bool:
    """Finished means every exported file exists: ``summary.json`` is written last and lists them."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        files = json.loads(summary.read_text(encoding="utf-8")).get("files", {})
    except (ValueError, OSError):
        return False
    return bool(files) and all(project_path(f).is_file() for f in files.values())


def load_finished_run(run_dir: Path, cfg: TrainConfig, rows) -> TrainResult:
    """A finished run's result read back from its files, if it was trained with ``cfg`` on ``rows``."""
    from PIL import Image

    recorded = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))
    problems = changed_settings({k: v for k, v in recorded.items() if k in config_record(cfg)}, cfg)
    if recorded.get("trigger_words", []) != list(cfg.trigger_words):
        # the files record their trigger words: a run with other words is another LoRA
        problems.append(f"trigger_words: {recorded.get('trigger_words', [])!r} in the files, "
                        f"{list(cfg.trigger_words)!r} now")
    if recorded.get("dataset_fingerprint") not in (None, dataset_fingerprint(rows)):
        problems.append("the training set changed since it was trained")
    if problems:
        raise TrainingError(f"{relative_to_root(run_dir)} holds a finished LoRA trained differently:\n  - "
                            + "\n  - ".join(problems) + f"\nChoose another run_name, or {FRESH_RUN} to "
                            "train it again with these settings.")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    with (run_dir / "loss.csv").open(encoding="utf-8", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    samples = []
    for png in sorted((run_dir / "samples").glob("step-*.png")):
        with Image.open(png) as im:
            samples.append((int(png.stem.split("-")[1]), [im.convert("RGB")]))
    print(f"{relative_to_root(run_dir)} is already trained with these settings: using it as it is "
          f"({FRESH_RUN} trains it again)")
    steps = summary["steps"]
    return TrainResult(run_dir, steps, losses, {k: project_path(v) for k, v in summary["files"].items()},
                       summary["seconds"], summary["seconds_per_step"], summary["peak_memory_gb"],
                       summary.get("resumed_from"), samples, summary.get("fixed_set_loss_before"),
                       summary.get("fixed_set_loss_after"), summary.get("peak_training_loop_gb", 0.0),
                       [tuple(x) for x in summary.get("fixed_set_losses", [])])


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def swap_into_place(new: Path, final: Path) -> None:
    """Replace ``final`` by the complete folder ``new``; the old run is removed only afterwards."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class RunFolder:
    """Where a run writes (``folder``) and where it ends up (``final``: the same folder, or the
    run it replaces once complete with ``overwrite=True``); the checkpoint to resume from, or a
    finished run's result to return as it is."""
    final: Path
    folder: Path
    checkpoint: Path | None = None
    finished: TrainResult | None = None


def open_run(final: Path, cfg: TrainConfig, rows, resume="auto", overwrite: bool = False,
             reuse_finished: bool = False) -> RunFolder:
    """Decide what a call of ``train_lora`` does with ``final``: train afresh beside it
    (``overwrite``), return it finished (``reuse_finished``), resume its latest checkpoint, or
    refuse, each refusal saying what to pass instead."""
    if overwrite:
        if resume is True:
            raise TrainingError("overwrite=True starts a fresh run, resume=True continues one: choose one")
        # a fresh run beside the old one; the old one stays until the new one is complete
        folder = final.with_name(f".{final.name}.new")
        shutil.rmtree(folder, ignore_errors=True)
    else:
        folder = final
        if run_finished(folder) and reuse_finished:
            return RunFolder(final, folder, finished=load_finished_run(folder, cfg, rows))
        if run_finished(folder):
            raise TrainingError(f"{relative_to_root(folder)} already holds a finished LoRA; choose another "
                                f"run_name, or {FRESH_RUN} to train it again")
    ckpts = list_checkpoints(folder)
    if ckpts and resume is False:
        raise TrainingError(f"{relative_to_root(folder)} has checkpoints; pass resume=True to continue "
                            f"them, {FRESH_RUN} to start afresh, or choose another run_name")
    if resume is True and not ckpts:
        raise TrainingError(f"nothing to resume in {relative_to_root(folder)}: no checkpoint found")
    return RunFolder(final, folder, checkpoint=ckpts[-1] if ckpts else None)


def close_run(run: RunFolder, res: TrainResult, memory, peaks: dict) -> dict:
    """Write ``summary.json`` (last: its presence, with every file it lists, marks the run
    finished), swap a fresh run into place, and return the files' final paths."""
    files, final = res.files, run.final
    write_json(run.folder / "summary.json", {
        "steps": res.steps, "seconds": round(res.seconds, 2), "seconds_per_step": round(res.seconds_per_step, 4),
        "peak_memory_gb": round(memory.overall, 3), "peak_training_loop_gb": round(peaks["training_loop"], 3),
        "memory_measure": "GPU allocations (GB, 10^9 bytes)" if memory.cuda else "process resident size (GB)",
        "resumed_from": res.resumed_from,
        "fixed_set_loss_before": res.fixed_loss_before, "fixed_set_loss_after": res.fixed_loss_after,
        "fixed_set_losses": [list(x) for x in res.fixed_losses],
        "fixed_set_loss_before_note": None if res.fixed_loss_before is not None else
        "not measured: resumed from a checkpoint written before the kit stored it",
        "first_loss": res.losses[0] if res.losses else None,
        "last_loss": res.losses[-1] if res.losses else None,
        "files": {k: relative_to_root(final / Path(v).relative_to(run.folder)) for k, v in files.items()}})
    if run.folder != final:
        swap_into_place(run.folder, final)
    return {k: final / Path(v).relative_to(run.folder) for k, v in files.items()}
