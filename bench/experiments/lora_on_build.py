"""Does notebook 03's LoRA lesson work on a candidate tiny build?  (README, "The tiny world".)
An experiment, not a benchmark: the tests' LoRA fixture and measures (``tests/test_tiny_lessons.py``:
notebook 02's pastel data set, ``train_lora`` with the tiny profile's settings, the pastel index at
strength 0 / 0.5 / 1 / 1.5 on the tests' 3 prompts x 2 seeds with the trigger word, and the rise at
strength 1 without it) over the weights in a build folder instead of the shipped ones.

    python bench/experiments/lora_on_build.py BUILD|shipped [PROFILE_FIELD=VALUE ...] [seed=N]

BUILD is a ``kolors-course build-tiny`` folder with a manifest (the ControlNet is not needed);
``shipped`` takes the kit's own.  Fields override the tiny profile's LoRA settings
(``learning_rate=0.03 train_steps=200 lora_rank=8 lora_alpha=8 lora_preserve_weight=2``);
``seed`` is the LoRA's training seed (the tests': 0).  Prints one line: the index per strength, the
rise, the leak, and PASS / FAIL against the tests' thresholds.  About 40 s on 2 cores.
"""
import ast
import sys
import tempfile
from pathlib import Path

import numpy as np

from kolors_course.core.profiles import choose_profile
from kolors_course.data.build import Captions, build_training_set
from kolors_course.generation.text2image import generate
from kolors_course.lora.config import TrainConfig
from kolors_course.lora.strength import set_lora_scale
from kolors_course.lora.train import train_lora
from kolors_course.models.loading import load_pipeline


def pastel_index(img) -> float:
    """As the tests measure it: the mean of each pixel's smallest channel (0..1)."""
    return float(np.asarray(img, np.float32).min(axis=2).mean() / 255)


if len(sys.argv) < 2:
    raise SystemExit(__doc__)
build, args = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
seed = int(args.pop("seed", 0))
with tempfile.TemporaryDirectory(prefix="lora-on-build-") as tmp:
    tmp = Path(tmp)
    where = {} if build == "shipped" else {"tiny_weights": str(Path(build).resolve())}
    prof = choose_profile("tiny", verbose=False, cache_dir=str(tmp / "cache"), **where,
                          **{k: ast.literal_eval(v) for k, v in args.items()})
    pipe = load_pipeline(prof)
    ds = build_training_set("synthetic", tmp / "ds", recipe=prof.recipe(),
                            captions=Captions(mode="source", trigger=prof.trigger_word), synthetic_size=prof.width)
    cfg = TrainConfig.for_profile(prof, trigger_words=[prof.trigger_word], seed=seed)
    path = train_lora(prof, ds.folder, tmp / "run", cfg).files["lora"]
    prompts = [f"{prof.trigger_word}，一个{c}的{s}，{b}背景"
               for c, s, b in (("红色", "圆形", "蓝色"), ("黄色", "星形", "紫色"), ("绿色", "正方形", "黑色"))]
    plain = [p.split("，", 1)[1] for p in prompts]

    def mean_index(strength, ps):
        set_lora_scale(pipe, path, strength)
        return float(np.mean([pastel_index(generate(pipe, p, seed=s)) for p in ps for s in (1, 2)]))

    index = {s: mean_index(s, prompts) for s in (0.0, 0.5, 1.0, 1.5)}
    leak = mean_index(1.0, plain) - mean_index(0.0, plain)
rise = index[1.0] - index[0.0]
ok = rise > 0.15 and index[0.0] < index[0.5] < index[1.0] < index[1.5] and leak < 0.5 * rise
print(f"{build} {args or 'profile settings'} seed {seed}: pastel index "
      + " / ".join(f"{v:.2f}" for v in index.values()) + f" at 0 / 0.5 / 1 / 1.5; rise {rise:.2f}, leak {leak:.2f}"
      + (" PASS" if ok else " FAIL"))
