"""Two training processes (torchrun, gloo on the CPU) train as one process with the same global batch.

`accelerate launch` starts its processes through torchrun; on a CPU accelerate's own
launcher needs MPI, so the test uses torchrun directly, as the README shows.
"""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kolors_course.data.recipe import Recipe
from kolors_course.data.build import build_training_set
from kolors_course.lora.config import TrainConfig
from kolors_course.lora.train import train_lora


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path) -> list[float]:
    with (run / "loss.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_processes_train_as_one_with_the_same_global_batch(tiny, tmp_path):
    data = tmp_path / "ds"
    build_training_set("synthetic", data, recipe=Recipe(min_width=48, min_height=48), limit=8)
    settings = dict(max_steps=4, checkpoint_every=2, validate_every=None, resolution=tiny.train_resolution)
    one = train_lora(tiny, data, tmp_path / "one", TrainConfig.for_profile(tiny, batch_size=2, **settings))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "kolors_course.cli", "--", "train", "--dataset", str(data), "--run", str(tmp_path / "two"),
           "--profile", "tiny", "-s", "batch_size", "1"]
    for k, v in settings.items():
        cmd += ["-s", k, "null" if v is None else str(v)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert json.loads((two / "train_config.json").read_text())["processes"] == 2
    # each process took its half of every global batch: the global losses are the same
    assert _losses(two) == pytest.approx(one.losses, rel=1e-5)
    # the weights agree to float rounding, amplified where AdamW divides by tiny gradients
    a, b = load_file(str(one.files["lora"])), load_file(str(two / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-3)
    # only the main process wrote files: one set, nothing half-written
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not list(two.rglob("*.tmp"))
