"""Which part of the tiny world keeps the UNet from reading the shape word (docs/tiny_world_log.md,
"The shape word, probed").  An experiment, not a benchmark: it trains a fresh tiny UNet with the build's
own stage (`kolors_course.world.build`, the shipped VAE beside it) on a reduced world and judges the
shapes it then draws.

    python bench/experiments/shape_word_probe.py OUT STEPS WORLD [UNET_OPTION=VALUE ...]

WORLD: ``shape`` (400 pictures, red on blue, big, middle, flat: only the shape differs; captions
一个圆形 / 圆形 / 一个红色的圆形，蓝色背景), ``colours`` (2,500 pictures, every colour pair, all else
as ``shape``; the world's own captions) or ``colours_plain`` (the same pictures, three plain templates).
Options are ``UNetConfig`` fields over the build's recipe, e.g. ``x0_weight_cap=None high_t_fraction=0.0``.
Prints the judge's shape accuracy for 一个{colour}的{shape}，{background}背景 (4 colour pairs x 2 seeds
per shape) and for red on blue (8 seeds per shape, the ``shape`` world's only pair), and writes
OUT/grid.png (red on blue, a row per shape).  About 10 minutes for 1,500 steps on
2 cores.  The build's world and latent statistics are swapped for the probe's by patching the build
module for this process only: the shipped VAE's statistics are kept, so its decoder reads the latents.
"""
import ast
import json
import random
import shutil
import sys
from pathlib import Path

import kolors_course.models.tiny as T
import kolors_course.world.build as B
import kolors_course.world.scenes as W

out, steps, kind = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
over = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
if kind not in ("shape", "colours", "colours_plain"):
    raise SystemExit(f"WORLD {kind!r}: choose shape, colours or colours_plain")
shipped = Path(B.__file__).parent / "weights"
manifest = json.loads((shipped / "manifest.json").read_text())

# the shipped VAE beside the probe's UNet, with the record the finish stage checks
if not (out / "parts" / "vae.json").exists():
    (out / "parts").mkdir(parents=True, exist_ok=True)
    (out / T.VAE_REL).parent.mkdir(parents=True, exist_ok=True)
    for name in (T.VAE_REL.name, "config.json"):
        shutil.copy(shipped / T.VAE_REL.parent / name, out / T.VAE_REL.parent / name)
    drop = ("image_size", "unet_channels", "vae_channels", "unet_parameters", "vae_parameters", "vae", "unet")
    settings = {k: v for k, v in manifest["settings"].items() if k not in drop and not k.startswith(("unet", "controlnet"))}
    settings["threads"] = manifest["threads"]["vae"]
    (out / "parts" / "vae.json").write_text(json.dumps({
        "stage": "vae", "settings": settings, "command": manifest["command"]["vae"], "seconds": 0,
        "config": manifest["settings"]["vae"], "cell_stats": manifest["cell_stats"], "pictures": 0,
        "parameters": manifest["settings"]["vae_parameters"], "losses": {}}, ensure_ascii=False))

world_of_the_build = B._world


def probe_world(knobs, seed, size, quick):
    rng = random.Random(seed)
    if kind == "shape":
        scenes = [W.Scene(shape=W.SHAPES[i % 4], colour="红色", background="蓝色") for i in range(400)]
    else:
        scenes = []
        for _ in range(2500):
            c, b = rng.sample(list(W.COLOURS), 2)
            scenes.append(W.Scene(shape=rng.choice(W.SHAPES), colour=c, background=b))
    seeds = [B._render_seed(seed, i) for i in range(len(scenes))]
    pixels = B.images_to_tensor([W.render(s, size=size, seed=r) for s, r in zip(scenes, seeds)])
    crng = random.Random(1)
    if kind == "shape":
        caps = [[f"一个{s.shape}", s.shape, f"一个红色的{s.shape}，蓝色背景", ""] for s in scenes]
    elif kind == "colours":
        caps = [[W.caption(s, crng) for _ in range(3)] for s in scenes]
    else:
        caps = [[f"一个{s.colour}的{s.shape}，{s.background}背景", f"{s.background}背景上的一个{s.colour}{s.shape}",
                 f"{s.colour}{s.shape}", ""] for s in scenes]
    held = world_of_the_build(dict(knobs, n_scenes=8), seed, size, True).held_pixels
    return B.TrainingWorld(scenes, seeds, pixels, caps, held)


B._world = probe_world
stats = manifest["cell_stats"]
B.CellStats.of = classmethod(lambda cls, *a, **k: cls(stats["mean"], stats["std"]))
B.build_tiny(out, stages=("unet",), unet_steps=steps, threads=2, log_file=str(out / "unet.log"), unet_recipe=over)
B._world = world_of_the_build
B.build_tiny(out, stages=("finish",), evaluate_result=False, threads=2)

from PIL import Image  # noqa: E402

from kolors_course.core.profiles import choose_profile  # noqa: E402
from kolors_course.generation.text2image import generate  # noqa: E402
from kolors_course.models.loading import load_pipeline  # noqa: E402
from kolors_course.world.judge import judge  # noqa: E402

pipe = load_pipeline(choose_profile("tiny", verbose=False, tiny_weights=str(out)))
right = {s: 0 for s in W.SHAPES}
for s in W.SHAPES:
    for c, b in (("红色", "蓝色"), ("黄色", "紫色"), ("绿色", "黑色"), ("白色", "红色")):
        for seed in (0, 1):
            right[s] += judge(generate(pipe, f"一个{c}的{s}，{b}背景", seed=seed)).shape == s
print("shape right:", {s: f"{n}/8" for s, n in right.items()}, f"{sum(right.values()) / 32:.0%}")
grid = Image.new("RGB", (128 * 8, 128 * 4))
red_on_blue = {s: 0 for s in W.SHAPES}
for row, s in enumerate(W.SHAPES):
    for k in range(8):
        image = generate(pipe, f"一个红色的{s}，蓝色背景", seed=k)
        red_on_blue[s] += judge(image).shape == s
        grid.paste(image, (k * 128, row * 128))
grid.save(out / "grid.png")
print("red on blue, 8 seeds:", {s: f"{n}/8" for s, n in red_on_blue.items()}, f"{sum(red_on_blue.values()) / 32:.0%}")
print("grid:", out / "grid.png")
