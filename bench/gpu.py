"""GPU memory and speed of the kolors profile, per memory mode, with Kolors-sized random weights.

    python bench/gpu.py                   # every case, each in a fresh process, table + JSON
    python bench/gpu.py --case full-80    # one case

Memory and speed do not depend on the weights' values, so random weights of the
real sizes (2.6 B UNet, 6.2 B ChatGLM3, SDXL VAE) stand in for the 18 GB download.
Smaller cards are emulated on a large one with
``torch.cuda.set_per_process_memory_fraction``: the caching allocator then refuses
to go past that many GB, as a smaller card would (it does not emulate a slower card).

Each case runs in its own process so that one case's cache and fragmentation do
not colour the next.  Peaks are ``torch.cuda.max_memory_allocated`` from the moment
the models are on the GPU (the load counts), in GB (10^9 bytes); "reserved" is
what the allocator held, which is what must fit on the card.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KOLORS_COURSE_HOME", str(ROOT))
os.environ["KOLORS_COURSE_HEADLESS"] = "1"

PROMPT = "二次元，一个蓝色长发小女孩，在海滩上坐着"
GB = 1e9

# case -> (what, memory mode, emulated card in GB)
CASES = {
    "generate-full-80": ("generate", "full", None),
    "generate-full-24": ("generate", "full", 24),
    "generate-offload-16": ("generate", "offload", 16),
    "train-full-80": ("train", "full", None),
    "train-full-24": ("train", "full", 24),
    "train-offload-16": ("train", "offload", 16),
    # notebook 05: the same image steered by the SDXL ControlNet-Union (canny, strength 0.8)
    "control-full-80": ("control", "full", None),
    "control-offload-16": ("control", "offload", 16),
}


def _gb(x: float) -> float:
    return round(x / GB, 2)


def _synthetic_set(folder: Path, n: int = 8, size: int = 1024) -> Path:
    """A tiny training folder in the trainer's layout, drawn here (no data-juicer needed)."""
    import csv
    import random

    from PIL import Image, ImageDraw

    train = folder / "train"
    if (train / "metadata.csv").exists():
        return folder
    train.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with (train / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        for i in range(n):
            im = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
            d = ImageDraw.Draw(im)
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randrange(size // 8, size // 3)
            d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
            im.save(train / f"{i:05d}.jpg", quality=95)
            w.writerow([f"{i:05d}.jpg", "二次元，一个彩色的圆形"])
    return folder


def run_case(name: str, steps: int = 50, train_steps: int = 10) -> dict:
    import torch

    import kolors_course as kc
    from kolors_course.models.random_weights import random_pipeline

    what, mode, card = CASES[name]
    out = {"case": name, "what": what, "mode": mode, "card_gb": card or "whole card",
           "device": torch.cuda.get_device_name(0)}
    prof = kc.choose_profile("kolors")
    t0 = time.perf_counter()
    # the kit's own memory modes: "offload" parks every model on the CPU between uses
    pipe = random_pipeline(prof.with_(memory_mode=mode), "kolors", "cuda", controlnet=what == "control")
    out["build_random_models_s"] = round(time.perf_counter() - t0, 1)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out["resident_after_load_gb"] = _gb(torch.cuda.memory_allocated())
    if card:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, card * GB / total))
        if torch.cuda.memory_allocated() > card * GB:
            out["result"] = f"does not fit: {_gb(torch.cuda.memory_allocated())} GB resident after load"
            return out
    try:
        if what in ("generate", "control"):
            extra = {}
            if what == "control":
                from PIL import Image, ImageDraw

                edges = Image.new("RGB", (1024, 1024))
                ImageDraw.Draw(edges).ellipse((256, 256, 768, 768), outline=(255, 255, 255), width=3)
                extra = dict(control_image=edges, control="canny", control_strength=0.8)
            t0 = time.perf_counter()
            kc.generate(pipe, PROMPT, seed=0, steps=2, **extra)          # warm-up (kernels, cuDNN plans)
            torch.cuda.synchronize()
            out["warmup_2_steps_s"] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            img = kc.generate(pipe, PROMPT, seed=0, steps=steps, **extra)
            torch.cuda.synchronize()
            out[f"generate_1024px_{steps}_steps_s"] = round(time.perf_counter() - t0, 2)
            out["image_size"] = list(img.size)
        else:
            from kolors_course.lora.config import TrainConfig
            from kolors_course.lora.train import train_lora

            ds = _synthetic_set(ROOT / "runs" / "bench-gpu" / "set")
            run = ROOT / "runs" / "bench-gpu" / f"run-{name}"
            import shutil

            shutil.rmtree(run, ignore_errors=True)
            cfg = TrainConfig.for_profile(prof, max_steps=train_steps, checkpoint_every=train_steps,
                                          validate_every=None)
            res = train_lora(prof, ds, run, cfg, pipe=pipe)
            out["train_s_per_step"] = round(res.seconds_per_step, 3)
            out["train_peak_loop_gb"] = round(res.peak_training_gb, 2)
            out["train_peak_run_gb"] = round(res.peak_memory_gb, 2)
            out["train_steps"] = res.steps
            out["precision"] = json.loads((run / "train_config.json").read_text())["precision_used"]
            out["exported"] = sorted(p.name for p in run.glob("*.safetensors"))
        out["result"] = "fits"
    except torch.cuda.OutOfMemoryError as exc:
        out["result"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
    out["peak_allocated_gb"] = _gb(torch.cuda.max_memory_allocated())
    out["peak_reserved_gb"] = _gb(torch.cuda.max_memory_reserved())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--json", default=str(ROOT / "runs" / "bench-gpu.json"))
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure (the tiny profile covers the code path)")
        return 0
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.steps, args.train_steps), ensure_ascii=False),
              flush=True)
        return 0
    results = []
    for name in CASES:
        print(f"-- {name}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--steps", str(args.steps),
                               "--train-steps", str(args.train_steps)], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        r = json.loads(lines[-1][7:]) if lines else {"case": name, "result": "crashed",
                                                      "stderr": proc.stderr[-1500:]}
        results.append(r)
        print("   " + json.dumps(r, ensure_ascii=False), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
