"""Does notebook 03's LoRA lesson work on a candidate tiny build?  (docs/tiny_world_log.md.)
An experiment, not a benchmark: the tests' LoRA fixture and measures (``kolors_course.world.evaluate``
``lesson_lora`` and ``lora_measures`` and ``lora_verdict``, as ``tests/test_tiny_lessons.py`` uses them:
notebook 02's pastel data set, ``train_lora`` with the tiny profile's settings, the pastel index at
strength 0 / 0.5 / 1 / 1.5 on the tests' 3 prompts x 2 seeds with the trigger word, and the rise at
strength 1 without it) over the weights in a build folder instead of the shipped ones.

    python bench/experiments/lora_on_build.py BUILD|shipped [PROFILE_FIELD=VALUE ...] [seed=N] [limit=N] [grid=PNG]

BUILD is a ``kolors-course build-tiny`` folder with a manifest (the ControlNet is not needed);
``shipped`` takes the kit's own.  Fields override the tiny profile's LoRA settings
(``learning_rate=0.03 train_steps=200 lora_rank=8 lora_alpha=8 lora_preserve_weight=2``;
``"lora_target_modules=('conv1','conv2','attn2.to_k','attn2.to_v')"`` trains a LoCon);
``seed`` is the LoRA's training seed (the tests': 0); ``limit`` the number of synthetic source
pictures notebook 02 makes (its own unless given); ``grid`` a PNG for the trigger-word pictures at
strength 0 / 0.5 / 1 (one row each).  Prints one line: the index per strength, the
rise, the leak, PASS / FAIL against the tests' thresholds (``evaluate.LORA_TARGETS``), and the share of pictures that keep the
prompt's colours at each strength (``kept``: the pastel index also rises when the
look washes the shape out).  About 50 s on 2 cores.
"""
import ast
import sys
import tempfile
from pathlib import Path

from kolors_course.core.profiles import choose_profile
from kolors_course.models.loading import load_pipeline
from kolors_course.world.evaluate import lesson_lora, lora_measures, lora_verdict

from _lora_report import save_grid   # beside this script

if len(sys.argv) < 2 or any("=" not in a for a in sys.argv[2:]):
    raise SystemExit(__doc__)
build, args = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
seed, limit, grid = int(args.pop("seed", 0)), args.pop("limit", None), args.pop("grid", None)
with tempfile.TemporaryDirectory(prefix="lora-on-build-") as tmp:
    tmp = Path(tmp)
    where = {} if build == "shipped" else {"tiny_weights": str(Path(build).resolve())}
    prof = choose_profile("tiny", verbose=False, cache_dir=str(tmp / "cache"), **where,
                          **{k: ast.literal_eval(v) for k, v in args.items()})
    pipe = load_pipeline(prof)
    keep = []
    m = lora_measures(pipe, lesson_lora(prof, tmp, seed=seed, limit=int(limit) if limit else None),
                      prof.trigger_word, keep=keep)
save_grid(keep, grid)
index, kept, v = m["index"], m["kept"], lora_verdict(m)
print(f"{build} {args or 'profile settings'} seed {seed}: pastel index "
      + " / ".join(f"{x:.2f}" for x in index.values()) + f" at 0 / 0.5 / 1 / 1.5; rise {v['rise']:.2f}, leak {v['leak']:.2f}"
      + (" PASS" if v["look"] else " FAIL")
      + "; the asked colours kept in " + " / ".join(f"{x:.0%}" for x in kept.values()) + " at 0 / 0.5 / 1 / 1.5"
      + (" (kept)" if v["kept"] else " (washed out)"))
