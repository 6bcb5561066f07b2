"""How much a word from outside the world changes the text encoder's output, per build (docs/tiny_world_log.md,
"Is the text encoder taught to flatten the trigger word?").  An experiment, not a benchmark.

    python bench/experiments/trigger_word_states.py [WORD] BUILD_DIR|random ...

For each build folder (``random``: the seeded encoder without trained layers), through the pipeline's own
prompter: how much WORD (default the tiny profile's trigger word, 几何风) in front of 4 world captions
changes their pooled embedding and their token states, over how much swapping one of those captions for
another does; and how far apart WORD and another outside word (水彩) in the same place put the token
states.  A LoRA on the UNet's attention (the course's) can only key on what the word changes.
Seconds on one thread.
"""
import sys

import torch

from kolors_course.core.profiles import TINY
from kolors_course.world.build import tiny_prompter
from kolors_course.world.train_unet import encode_captions

CAPTIONS = ["一个红色的圆形，蓝色背景", "一个黄色的星形，紫色背景", "一个绿色的正方形，黑色背景", "一个白色的三角形，红色背景"]
args = sys.argv[1:]
word = TINY.trigger_word
if args and not (args[0] == "random" or "/" in args[0] or args[0].startswith(".")):
    word, args = args[0], args[1:]
if not args:
    raise SystemExit(__doc__)
saved = torch.get_num_threads()
torch.set_num_threads(1)
try:
    for build in args:
        texts = CAPTIONS + [f"{word}，{c}" for c in CAPTIONS] + [f"水彩，{c}" for c in CAPTIONS]
        index, hidden, pooled = encode_captions(tiny_prompter(None if build == "random" else build), texts, log=None)

        def mean_gap(table, pairs):
            return sum(float((table[index[a]].float() - table[index[b]].float()).norm()) for a, b in pairs) / len(pairs)

        swaps = [(CAPTIONS[i], CAPTIONS[(i + 1) % 4]) for i in range(4)]
        with_word = [(f"{word}，{c}", c) for c in CAPTIONS]
        other_word = [(f"{word}，{c}", f"水彩，{c}") for c in CAPTIONS]
        print(f"{build}: pooled {mean_gap(pooled, with_word) / mean_gap(pooled, swaps):.2f} · "
              f"token states {mean_gap(hidden, with_word) / mean_gap(hidden, swaps):.2f} · "
              f"{word} against 水彩 {mean_gap(hidden, other_word) / mean_gap(hidden, swaps):.2f}  "
              "(the word's change over a caption swap's)", flush=True)
finally:
    torch.set_num_threads(saved)
