"""Benchmarks: the kit against the plain library calls it wraps, side by side in one run.

    make bench                 # everything
    python bench/run.py generate course

Each comparison alternates the two variants in the same process, several
rounds, and reports the ratio of medians (kit / plain).  Memory is the peak
resident size of a fresh child process doing only that work.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KOLORS_COURSE_HOME", str(ROOT))
os.environ["KOLORS_COURSE_HEADLESS"] = "1"

PROMPT = "二次元，一个蓝色长发小女孩，在海滩上坐着"


def _median_pair(kit_fn, plain_fn, rounds: int = 15, warmup: int = 2):
    for _ in range(warmup):
        kit_fn(); plain_fn()
    kit, plain = [], []
    for i in range(rounds):
        order = (kit_fn, plain_fn) if i % 2 == 0 else (plain_fn, kit_fn)
        for fn in order:
            t0 = time.perf_counter(); fn(); dt = time.perf_counter() - t0
            (kit if fn is kit_fn else plain).append(dt)
    return statistics.median(kit), statistics.median(plain)


def _child_peak_mb(code: str) -> float:
    """Peak RSS (MB) of a fresh Python running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(after, before) / 1024


def bench_generate() -> dict:
    import kolors_course as kc

    prof = kc.choose_profile("tiny")
    pipe = kc.load_pipeline(prof)

    def kit():
        kc.generate(pipe, PROMPT, seed=0)

    def plain():
        pipe(prompt=PROMPT, negative_prompt=kc.DEFAULT_NEGATIVE, cfg_scale=prof.cfg_scale,
             num_inference_steps=prof.steps, height=prof.height, width=prof.width, seed=0,
             progress_bar_cmd=lambda x: x)

    k, p = _median_pair(kit, plain)
    setup = "import kolors_course as kc; p=kc.load_pipeline(kc.choose_profile('tiny'));"
    mem_kit = _child_peak_mb(setup + f"kc.generate(p, {PROMPT!r}, seed=0)")
    mem_plain = _child_peak_mb(setup + f"p(prompt={PROMPT!r}, negative_prompt=kc.DEFAULT_NEGATIVE, "
                               "cfg_scale=4.0, num_inference_steps=2, height=64, width=64, seed=0)")
    return {"name": "generate one tiny image: kit.generate vs SDXLImagePipeline.__call__",
            "kit_s": k, "plain_s": p, "ratio": k / p, "target": "<= 1.02",
            "kit_peak_mb": mem_kit, "plain_peak_mb": mem_plain}


def bench_course() -> dict:
    out = ROOT / "runs" / "bench-course"
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "kolors_course.cli", "run", "--profile", "tiny",
                    "--out", str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) / 1024
    summary = json.loads((out / "summary.json").read_text())
    return {"name": "whole tiny course (every notebook, via kolors-course run)",
            "wall_s": wall, "peak_mb_largest_process": peak, "target": "<= 180 s, <= 2048 MB",
            "per_notebook_s": {r["notebook"]: r["seconds"] for r in summary["results"]}}


def _plain_pillow_filter(folder: Path, min_side: int, min_ratio=0.5, max_ratio=2.0, min_bytes=1024):
    """The plain loop: decode every image and apply the same three filters."""
    from PIL import Image

    kept = 0
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in {".jpg", ".png", ".gif"}:
            continue
        try:
            with Image.open(p) as im:
                im.load()
                w, h = im.size
        except Exception:
            continue
        if w >= min_side and h >= min_side and min_ratio <= w / h <= max_ratio \
                and p.stat().st_size >= min_bytes:
            kept += 1
    return kept


def bench_dataset(n: int = 2000, sizes=(64, 512)) -> dict:
    """The kit's dataset build (checks + data-juicer) vs a plain Pillow filter loop."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import data_juicer.core  # noqa: F401  imported once, as in a notebook kernel
    from kolors_course.data.recipe import Recipe
    from kolors_course.data.sources import make_synthetic_source
    from kolors_course.data.build import build_training_set

    out = {"name": f"dataset build of {n} synthetic images: kit (checks + data-juicer) vs plain Pillow loop",
           "target": "throughput ratio >= 0.5"}
    for base in sizes:
        src = ROOT / "runs" / "bench-data" / f"src-{n}-{base}"
        if not (src / "odd_blank.jpg").exists():
            make_synthetic_source(src, n=n, base=base)
        recipe = Recipe(min_width=base * 3 // 4, min_height=base * 3 // 4, min_size="1KB")
        kit_t, plain_t = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            res = build_training_set(str(src), ROOT / "runs" / "bench-data" / f"out-{base}", recipe=recipe)
            kit_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _plain_pillow_filter(src, base * 3 // 4)
            plain_t.append(time.perf_counter() - t0)
        k, p = statistics.median(kit_t), statistics.median(plain_t)
        out[f"{base}px_kit_s"] = k
        out[f"{base}px_plain_s"] = p
        out[f"{base}px_kit_images_per_s"] = (n + 10) / k
        out[f"{base}px_plain_images_per_s"] = (n + 10) / p
        out[f"{base}px_ratio"] = p / k
        out[f"{base}px_kept"] = res.n_out
    code = ("import os; os.environ['HF_HUB_OFFLINE']='1'; from kolors_course.data.build import build_training_set;"
            "from kolors_course.data.recipe import Recipe;"
            f"build_training_set({str(ROOT / 'runs' / 'bench-data' / f'src-{n}-64')!r}, "
            f"{str(ROOT / 'runs' / 'bench-data' / 'out-mem')!r}, recipe=Recipe(min_width=48, min_height=48))")
    out["64px_kit_peak_mb"] = _child_peak_mb(code)
    return out


def _plain_training_seconds_per_step(prof, rows, steps: int, cfg) -> float:
    """A plain peft + DiffSynth loop: the same model, data, optimizer and per-step work."""
    import random

    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from kolors_course.lora.data import load_image_tensor
    from kolors_course.models.loading import load_pipeline

    pipe = load_pipeline(prof)
    rng = random.Random(0)
    data = []
    with torch.no_grad():
        for path, text in rows:
            emb = pipe.encode_prompt(text, positive=True)
            lat = pipe.vae_encoder(load_image_tensor(path, cfg.resolution, True, rng)[None])
            data.append((lat, emb["encoder_hidden_states"], emb["add_text_embeds"]))
    unet = pipe.unet
    unet.requires_grad_(False)
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules)), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = pipe.scheduler
    sched.set_timesteps(sched.num_train_timesteps, training=True)
    gen = torch.Generator().manual_seed(0)
    unet.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen).tolist()
        lat = torch.cat([torch.flip(data[i][0], dims=[3]) if torch.rand((), generator=gen) < 0.5 else data[i][0]
                         for i in idx])
        emb = torch.cat([data[i][1] for i in idx])
        pooled = torch.cat([data[i][2] for i in idx])
        noise = torch.randn(lat.shape, generator=gen)
        t = sched.timesteps[int(torch.randint(0, len(sched.timesteps), (1,), generator=gen))]
        h, w = lat.shape[2] * 8, lat.shape[3] * 8
        pred = unet(sched.add_noise(lat, noise, t), timestep=t, encoder_hidden_states=emb,
                    add_text_embeds=pooled, add_time_id=torch.tensor([h, w, 0, 0, h, w]).repeat(len(idx)))
        loss = torch.nn.functional.mse_loss(pred.float(), sched.training_target(lat, noise, t).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
    return (time.perf_counter() - t0) / steps


def bench_train(steps: int = 150, rounds: int = 3) -> dict:
    import shutil

    import kolors_course as kc
    from kolors_course.data.recipe import Recipe
    from kolors_course.lora.config import TrainConfig
    from kolors_course.lora.train import train_lora

    prof = kc.choose_profile("tiny")
    ds = ROOT / "runs" / "bench-data" / "train-set"
    if not (ds / "train" / "metadata.csv").exists():
        kc.build_training_set("synthetic", ds, recipe=Recipe(min_width=48, min_height=48), limit=16)
    rows = kc.read_training_set(ds)
    cfg = TrainConfig.for_profile(prof, max_steps=steps, checkpoint_every=steps, validate_every=None)
    kit, plain = [], []
    for i in range(rounds):
        run = ROOT / "runs" / "bench-data" / "train-run"
        shutil.rmtree(run, ignore_errors=True)
        kit.append(train_lora(prof, ds, run, cfg).seconds_per_step)
        plain.append(_plain_training_seconds_per_step(prof, rows, steps, cfg))
    k, p = statistics.median(kit), statistics.median(plain)
    return {"name": f"LoRA training step on the tiny profile ({steps} steps, batch {cfg.batch_size}): "
                    "kit train_lora vs plain peft + DiffSynth loop",
            "kit_s_per_step": k, "plain_s_per_step": p, "ratio": k / p, "target": "<= 1.02",
            "note": "kit time includes its progress bar, loss checks and one checkpoint; "
                    "peak memory: see train_lora's summary.json"}


def bench_story(rounds: int = 7) -> dict:
    import tempfile

    import kolors_course as kc
    from kolors_course.story.stories import generate_story, generation_settings, load_story

    prof = kc.choose_profile("tiny")
    pipe = kc.load_pipeline(prof)
    tale = load_story("ink_fox")
    st = generation_settings(tale, prof)
    tmp = Path(tempfile.mkdtemp())

    def kit():
        generate_story(pipe, tale, st, tmp / "kit")

    def plain():
        for i, scene in enumerate(tale.scenes):
            img = pipe(prompt=tale.prompt(i), negative_prompt=tale.negative, cfg_scale=st["cfg_scale"],
                       num_inference_steps=st["steps"], height=st["height"], width=st["width"],
                       seed=scene.seed, progress_bar_cmd=lambda x: x)
            (tmp / "plain").mkdir(exist_ok=True)
            img.save(tmp / "plain" / f"scene_{i + 1:02d}.png")

    k, p = _median_pair(kit, plain, rounds=rounds, warmup=1)
    return {"name": "8-image story on the tiny profile: kit generate_story vs 8 plain pipeline calls "
                    "(both save PNGs)", "kit_s": k, "plain_s": p, "ratio": k / p, "target": "<= 1.02"}


BENCHES = {"generate": bench_generate, "story": bench_story, "dataset": bench_dataset, "train": bench_train,
           "course": bench_course}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHES)       # GPU figures: `python bench/gpu.py` on a CUDA machine
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHES)}")
        return 2
    results = []
    for name in names:
        print(f"-- {name}", flush=True)
        r = BENCHES[name]()
        results.append(r)
        for k, v in r.items():
            print(f"   {k}: {v:.4f}" if isinstance(v, float) else f"   {k}: {v}")
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "bench.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
