"""Would a LoRA on the UNet's convolutions (LoCon) give notebook 03's look without washing the shape
out?  (docs/tiny_world_log.md, "The LoRA's wash".)  An experiment, not a benchmark, and not the course's LoRA path
(``lora_on_build.py`` trains a LoCon through the kit's ``train_lora`` on notebook 02's set): this
trial trains peft adapters in place with the build's own UNet loop
(``world.train_unet``: min-SNR, offset noise 0.3; no output preservation, so the look also shows
without the trigger word) on ``scenes.lora_dataset`` (the world's pastel pictures, captions with the
trigger word first), then scales the adapters' B matrices for ``evaluate.lora_measures`` (the LoRA tests' prompts:
pastel index and share keeping their colours at 0 / 0.5 / 1 / 1.5, and the index without the word).

    python bench/experiments/locon_trial.py [pictures=256] [steps=200] [lr=3e-3] [rank=8]
        [targets=conv1,conv2,attn2.to_k,attn2.to_v] [seed=0] [grid=PNG]

``seed`` draws the adapters' initial A matrices and the training batches.

About 50 s on 2 cores for 200 steps.
"""
import json
import sys
from types import SimpleNamespace

import torch

from kolors_course.core.profiles import choose_profile
from kolors_course.lora.adapters import inject_lora
from kolors_course.models.loading import load_pipeline
from kolors_course.models.tiny import shipped_weights_dir
from kolors_course.world import scenes as W
from kolors_course.world.build import tiny_prompter
from kolors_course.world.evaluate import lora_measures
from kolors_course.world.train_unet import UNetConfig, encode_captions, kolors_scheduler, train_unet
from kolors_course.world.train_vae import CellStats, images_to_tensor, target_latents

from _lora_report import report   # beside this script

KNOWN = {"pictures", "steps", "lr", "rank", "targets", "seed", "grid"}
if any("=" not in a or a.split("=", 1)[0] not in KNOWN for a in sys.argv[1:]):
    raise SystemExit(__doc__)
args = dict(a.split("=", 1) for a in sys.argv[1:])
n, steps = int(args.get("pictures", 256)), int(args.get("steps", 200))
lr, rank, seed = float(args.get("lr", 3e-3)), int(args.get("rank", 8)), int(args.get("seed", 0))
targets = args.get("targets", "conv1,conv2,attn2.to_k,attn2.to_v").split(",")

prof = choose_profile("tiny", verbose=False)
pipe = load_pipeline(prof)
stats = CellStats(**json.loads((shipped_weights_dir() / "manifest.json").read_text())["cell_stats"])
images, captions = W.lora_dataset(n, seed=0, size=prof.width, trigger=prof.trigger_word)
latents = target_latents(images_to_tensor(images), stats)
index, hidden, pooled = encode_captions(tiny_prompter(shipped_weights_dir()), captions + [""], log=lambda *a: None)

unet = pipe.unet
unet.float()
# the kit's adapters (without add_lora's checks); seeded, the global generator put back after
inject_lora(unet, SimpleNamespace(rank=rank, alpha=rank, target_modules=targets, seed=seed))
cfg = UNetConfig(steps=steps, batch_size=16, learning_rate=lr, warmup_steps=10, ema_decay=0.0, weight_decay=0.0,
                 offset_noise=0.3, log_every=10 ** 9, seed=seed)
train_unet(unet, latents, [[index[c]] for c in captions], hidden, pooled, cfg, scheduler=kolors_scheduler(),
           log=lambda *a: None)
unet.eval()
trained_b = {name: p.detach().clone() for name, p in unet.named_parameters() if "lora_B" in name}


def scale_adapters(strength: float) -> None:
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name in trained_b:
                p.copy_(trained_b[name] * strength)


keep = []
report(lora_measures(pipe, None, prof.trigger_word, apply=scale_adapters, keep=keep), keep, args.get("grid"))
