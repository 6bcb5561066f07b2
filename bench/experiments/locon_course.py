"""Notebook 03's LoRA with convolution layers among its targets (LoCon), through the kit's own
``train_lora`` (notebook 02's data set, output preservation, the tiny profile's settings unless
overridden), fused by hand for the measures.  (README, "The LoRA's wash".)  An experiment: the
kit's ``add_lora`` accepts Linear layers only and its fusing goes through DiffSynth 1.1.9, which
fuses 1x1 but not 3x3 convolution LoRAs, so this script trains with ``adapters.inject_lora`` (the
same adapters without that check; for this process only) and adds B A to the UNet's weights itself
for ``evaluate.lora_measures``.

    python bench/experiments/locon_course.py [PROFILE_FIELD=VALUE ...] [seed=N] [limit=N] [grid=PNG]

Fields as in ``lora_on_build.py`` (for example ``"lora_target_modules=('conv1','conv2','attn2.to_k',
'attn2.to_v')" lora_rank=8 lora_alpha=8 learning_rate=1e-3 train_steps=320``); ``limit`` is the
number of synthetic source pictures notebook 02 makes (24 unless given).  Prints the pastel index
and the share of pictures keeping their colours (``evaluate.keeps_content``) at strength
0 / 0.5 / 1 / 1.5 with the trigger word, then at 0 and 1 without it.  About a minute on 2 cores.
"""
import ast
import sys
import tempfile
from pathlib import Path

import torch

import kolors_course.lora.train as lora_train
from kolors_course.core.profiles import choose_profile
from kolors_course.data.build import Captions, build_training_set
from kolors_course.lora.adapters import inject_lora
from kolors_course.lora.config import TrainConfig
from kolors_course.models.loading import load_pipeline
from kolors_course.world.evaluate import lora_measures

from _lora_report import report   # beside this script


if any("=" not in a for a in sys.argv[1:]):
    raise SystemExit(__doc__)
args = dict(a.split("=", 1) for a in sys.argv[1:])
seed, limit, grid = int(args.pop("seed", 0)), args.pop("limit", None), args.pop("grid", None)
lora_train.add_lora = inject_lora
with tempfile.TemporaryDirectory(prefix="locon-course-") as tmp:
    tmp = Path(tmp)
    prof = choose_profile("tiny", verbose=False, cache_dir=str(tmp / "cache"),
                          **{k: ast.literal_eval(v) for k, v in args.items()})
    pipe = load_pipeline(prof)
    ds = build_training_set("synthetic", tmp / "ds", recipe=prof.recipe(), limit=int(limit) if limit else None,
                            captions=Captions(mode="source", trigger=prof.trigger_word), synthetic_size=prof.width)
    cfg = TrainConfig.for_profile(prof, trigger_words=[prof.trigger_word], seed=seed)
    path = lora_train.train_lora(prof, ds.folder, tmp / "run", cfg).files["lora"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
trained_scale = float(meta["lora_alpha"]) / float(meta["lora_rank"])
weights = dict(pipe.unet.named_parameters())
modules = sorted({k.split(".lora_")[0] for k in state})
base = {m: weights[m + ".weight"].detach().clone() for m in modules}


def fuse(strength: float) -> None:
    with torch.no_grad():
        for m in modules:
            a, b = state[m + ".lora_A.weight"].float(), state[m + ".lora_B.weight"].float()
            delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) if a.ndim == 4 else b @ a
            weights[m + ".weight"].copy_((base[m].float() + strength * trained_scale * delta).to(base[m].dtype))


keep = []
report(lora_measures(pipe, None, prof.trigger_word, apply=fuse, keep=keep), keep, grid)
