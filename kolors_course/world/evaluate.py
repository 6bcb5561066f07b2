"""What a pipeline does with the world's prompts, measured by the judge.

``evaluate(pipe)`` generates through the kit's public path (``kc.generate``) and returns one
dict of metrics, each with the prompts and seeds it used, so that tests, the README and the
build's manifest quote the same numbers:

- ``adherence``: "一个{colour}的{shape}，{background}背景" -> shape colour, background, shape right;
- ``unknown_word``: the same prompts with an unknown word in front (default the LoRA trigger
  word 几何风) -> the share of that accuracy kept;
- ``position``: "...，在左边" / "...，在右边" -> left/right right;
- ``negative``: "一个{shape}" with a colour as negative prompt -> how much of that colour's share
  (as shape or background) is left, against the kit's default negative prompt (by default for
  the two colours drawn most often without it);
- ``cfg``: adherence at cfg 1 against the chosen cfg, and clipped (0 or 255) pixels rising
  from the chosen cfg to cfg 10;
- ``parts``: each of the course's five prompt parts (subject, details, modifiers, style,
  artist), added to a prompt, changes the picture: the judged attribute follows the words,
  and the mean pixel change against the prompt without that part.
"""
from __future__ import annotations

import random

import numpy as np

from kolors_course.world import scenes as W
from kolors_course.world.judge import judge

EVAL_STEPS = 20
EVAL_CFG = 4.0
EVAL_SIZE = 128
UNKNOWN_WORD = "几何风"


def _triple(seed: int):
    rng = random.Random(f"eval:{seed}")
    colour, background = rng.sample(list(W.COLOURS), 2)
    return rng.choice(W.SHAPES), colour, background


def _gen(pipe, prompt, seed, cfg_scale, steps, size, negative_prompt=None):
    from kolors_course.generation.text2image import DEFAULT_NEGATIVE, generate

    neg = DEFAULT_NEGATIVE if negative_prompt is None else negative_prompt
    return generate(pipe, prompt, negative_prompt=neg, seed=seed, cfg_scale=cfg_scale, steps=steps,
                    height=size, width=size)


def _clipped(img) -> float:
    a = np.asarray(img)
    return float(((a == 0) | (a == 255)).mean())


def _adherence(pipe, seeds, cfg_scale, steps, size, prefix="", negative_prompt=None, keep=None):
    hits = {"colour": 0, "background": 0, "shape": 0, "all": 0}
    clipped, prompts = [], []
    for s in seeds:
        shape, colour, background = _triple(s)
        prompt = f"{prefix}一个{colour}的{shape}，{background}背景"
        img = _gen(pipe, prompt, s, cfg_scale, steps, size, negative_prompt)
        if keep is not None:
            keep.append(img)
        v = judge(img, with_style=False)
        ok = {"colour": v.colour == colour, "background": v.background == background, "shape": v.shape == shape}
        for k, b in ok.items():
            hits[k] += b
        hits["all"] += all(ok.values())
        clipped.append(_clipped(img))
        prompts.append(prompt)
    n = len(seeds)
    return {**{k: v / n for k, v in hits.items()}, "clipped": float(np.mean(clipped)), "n": n,
            "example_prompts": prompts[:3]}


def _share(verdicts, colour) -> float:
    return float(np.mean([(v.colour == colour) or (v.background == colour) for v in verdicts]))


def evaluate(pipe, seeds=range(32), steps: int = EVAL_STEPS, cfg_scale: float = EVAL_CFG,
             size: int = EVAL_SIZE, negative_colours=2,
             unknown_word: str = UNKNOWN_WORD, parts: bool = True, log=None) -> dict:
    """The target metrics for ``pipe`` (a ``kc.load_pipeline`` pipeline), on ``seeds``.

    ``negative_colours``: the colours the negative-prompt check names, or a number k: the k colours
    the pipeline draws most often (as shape or background) when the prompt names none.  A negative
    prompt can only remove a colour that would otherwise be there: a colour drawn once in 16
    pictures says nothing about an 80% cut."""
    seeds = list(seeds)
    say = log or (lambda *_: None)
    out = {"settings": {"seeds": [seeds[0], seeds[-1]], "n": len(seeds), "steps": steps, "cfg_scale": cfg_scale,
                        "size": size, "negative_prompt": "kc.DEFAULT_NEGATIVE unless stated"}}
    base_imgs: list = []
    out["adherence"] = _adherence(pipe, seeds, cfg_scale, steps, size, keep=base_imgs)
    out["adherence"]["prompt"] = "一个{colour}的{shape}，{background}背景"
    say("adherence", out["adherence"])
    unk = _adherence(pipe, seeds, cfg_scale, steps, size, prefix=f"{unknown_word}，")
    unk["prompt"] = f"{unknown_word}，一个{{colour}}的{{shape}}，{{background}}背景"
    base = out["adherence"]
    unk["kept"] = {k: (unk[k] / base[k] if base[k] else None) for k in ("colour", "background", "shape", "all")}
    out["unknown_word"] = unk
    say("unknown word", unk)

    cfg1 = _adherence(pipe, seeds, 1.0, steps, size)
    cfg10 = _adherence(pipe, seeds, 10.0, steps, size)
    out["cfg"] = {"adherence_all": {"1": cfg1["all"], str(cfg_scale): base["all"], "10": cfg10["all"]},
                  "adherence_colour": {"1": cfg1["colour"], str(cfg_scale): base["colour"], "10": cfg10["colour"]},
                  "clipped": {"1": cfg1["clipped"], str(cfg_scale): base["clipped"], "10": cfg10["clipped"]}}
    say("cfg", out["cfg"])

    hits = 0
    for s in seeds:
        shape, colour, background = _triple(s)
        pos = "左边" if s % 2 == 0 else "右边"
        v = judge(_gen(pipe, f"{background}背景上的一个{colour}{shape}，在{pos}", s, cfg_scale, steps, size),
                  with_style=False)
        hits += v.position == pos
    out["position"] = {"accuracy": hits / len(seeds), "prompt": "{background}背景上的一个{colour}{shape}，在{左边|右边}",
                       "n": len(seeds)}
    say("position", out["position"])

    # negative prompt: the colour's share among pictures of "一个{shape}"
    plain = [judge(_gen(pipe, f"一个{W.SHAPES[s % 4]}", s, cfg_scale, steps, size), with_style=False) for s in seeds]
    if isinstance(negative_colours, int):
        drawn = {c: _share(plain, c) for c in W.COLOURS}
        negative_colours = sorted(drawn, key=lambda c: -drawn[c])[:negative_colours]     # stable: ties by palette
    neg = {}
    for c in negative_colours:
        vs = [judge(_gen(pipe, f"一个{W.SHAPES[s % 4]}", s, cfg_scale, steps, size, negative_prompt=c),
                    with_style=False) for s in seeds]
        neg[c] = {"share_default_negative": _share(plain, c), "share_with_negative": _share(vs, c)}
    before = sum(v["share_default_negative"] for v in neg.values())
    after = sum(v["share_with_negative"] for v in neg.values())
    out["negative"] = {"per_colour": neg, "cut": (1 - after / before) if before else None,
                       "prompt": "一个{shape}; negative prompt = the colour"}
    say("negative", out["negative"])

    if parts:
        out["parts"] = _parts(pipe, seeds, cfg_scale, steps, size)
        say("parts", out["parts"])
    return out


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def _parts(pipe, seeds, cfg_scale, steps, size) -> dict:
    """Each prompt part of the course, added to "一个{colour}的{shape}，{background}背景"."""
    res = {}
    checks = {
        # part: (field judged, values the words name, how the words enter the prompt)
        "subject": ("shape", W.SHAPES, lambda c, b, sh, v: f"一个{c}的{v}，{b}背景"),
        "details": ("colour", tuple(W.COLOURS), lambda c, b, sh, v: f"一个{v}的{sh}，{b}背景"),
        "modifiers_size": ("size", W.SIZES, lambda c, b, sh, v: f"一个{v}{c}的{sh}，{b}背景"),
        "modifiers_position": ("position", ("左边", "右边"), lambda c, b, sh, v: f"一个{c}的{sh}，{b}背景，在{v}"),
        "style": ("style", W.STYLES, lambda c, b, sh, v: f"{v}风格，一个{c}的{sh}，{b}背景"),
        "artist": ("painter", ("林一舟", "苏慕远"), lambda c, b, sh, v: f"一个{c}的{sh}，{b}背景，{v}风格"),
    }
    for part, (field, values, make) in checks.items():
        hits, diffs, n = 0, [], 0
        for s in seeds:
            sh, c, b = _triple(s)
            value = values[s % len(values)]
            if part == "details" and value == b:
                value = values[(s + 1) % len(values)]
            without = _gen(pipe, f"一个{c}的{sh}，{b}背景" if part not in ("subject", "details") else
                           (f"一个{c}的图形，{b}背景" if part == "subject" else f"一个{sh}，{b}背景"),
                           s, cfg_scale, steps, size)
            img = _gen(pipe, make(c, b, sh, value), s, cfg_scale, steps, size)
            v = judge(img)
            hits += getattr(v, field) == value
            diffs.append(_diff(img, without))
            n += 1
        res[part] = {"judged": field, "accuracy": hits / n, "chance": 1 / len(values),
                     "mean_pixel_change": float(np.mean(diffs)), "n": n,
                     "example_prompt": make(*_triple(seeds[0])[1:], _triple(seeds[0])[0], values[0])}
    return res


def summary_lines(m: dict) -> list[str]:
    """The headline numbers of ``evaluate`` as short lines (for logs and the README)."""
    a, u, c, p, n = m["adherence"], m["unknown_word"], m["cfg"], m["position"], m["negative"]
    lines = [f"adherence (n={a['n']}): colour {a['colour']:.0%}, background {a['background']:.0%}, "
             f"shape {a['shape']:.0%}, all three {a['all']:.0%}",
             f"unknown word kept: colour {u['kept']['colour'] or 0:.0%}, background {u['kept']['background'] or 0:.0%}, "
             f"shape {u['kept']['shape'] or 0:.0%}",
             f"position left/right: {p['accuracy']:.0%}",
             f"negative prompt cut ({', '.join(n['per_colour'])}): "
             f"{n['cut'] if n['cut'] is not None else float('nan'):.0%}",
             "cfg adherence (all three) 1 / 4 / 10: " + " / ".join(f"{v:.0%}" for v in c["adherence_all"].values()),
             "cfg clipped pixels 1 / 4 / 10: " + " / ".join(f"{v:.2%}" for v in c["clipped"].values())]
    for part, r in m.get("parts", {}).items():
        lines.append(f"part {part}: {r['judged']} right {r['accuracy']:.0%} (chance {r['chance']:.0%}), "
                     f"mean pixel change {r['mean_pixel_change']:.1f}")
    return lines


#: the control lesson's scenes: flat, no painter, so the reference's edges are only the outline
def control_scenes(seeds) -> list:
    out = []
    for s in seeds:
        rng = random.Random(f"control:{s}")
        scene = W.random_scene(rng)
        out.append(W.Scene(shape=scene.shape, colour=scene.colour, background=scene.background,
                           size=scene.size, position=scene.position))
    return out


def evaluate_control(pipe, seeds=range(16), strengths=(0.0, 1.0), steps: int = EVAL_STEPS,
                     cfg_scale: float = EVAL_CFG, size: int = EVAL_SIZE, colour_cells: int = 8) -> dict:
    """How closely generated pictures follow a reference's canny edges and colour layout.

    For each seed a world scene is drawn as the reference; its prompt names the shape, its colour
    and the background, not its size or place, which only the reference gives.  At each strength:
    ``canny`` is the mean ``edge_overlap`` (F1, 3-pixel tolerance) of the pictures against the
    reference's canny map, ``colour`` the mean ``colour_layout_error`` against its colour grid.
    """
    from kolors_course.control.conditions import canny, colour
    from kolors_course.control.measure import colour_layout_error, edge_overlap
    from kolors_course.control.steer import control_sweep
    from kolors_course.generation.text2image import DEFAULT_NEGATIVE

    seeds = list(seeds)
    out = {"canny": {}, "colour": {}, "seeds": seeds, "steps": steps, "cfg_scale": cfg_scale,
           "colour_cells": colour_cells, "prompts": []}
    refs = [W.render(sc, size=size, seed=s) for sc, s in zip(control_scenes(seeds), seeds)]
    prompts = [W.prompt_for(sc) for sc in control_scenes(seeds)]
    out["prompts"] = prompts
    by_seed = []
    for s, ref, prompt in zip(seeds, refs, prompts):
        conds = {"canny": canny(ref), "colour": colour(ref, colour_cells)}
        images = control_sweep(pipe, prompt, conds, strengths=strengths, negative_prompt=DEFAULT_NEGATIVE, seed=s,
                               cfg_scale=cfg_scale, steps=steps, height=size, width=size)
        by_seed.append((conds, images))
    for strength in strengths:
        f1 = [edge_overlap(images["canny", strength], conds["canny"]) for conds, images in by_seed]
        err = [colour_layout_error(images["colour", strength], conds["colour"], colour_cells)
               for conds, images in by_seed]
        out["canny"][f"{strength:g}"] = float(np.mean(f1))
        out["colour"][f"{strength:g}"] = float(np.mean(err))
    return out


# --- the LoRA lesson (notebooks 02-04): one measure for the tests and bench/experiments ---------
#: the prompts the look is measured on: the trigger word first, then a world caption
LORA_PROMPTS = (("红色", "圆形", "蓝色"), ("黄色", "星形", "紫色"), ("绿色", "正方形", "黑色"))


#: what the LoRA lesson must show (the tests' thresholds; ``lora_verdict`` applies them): the pastel
#: index rises by more than ``rise`` from strength 0 to 1 with the trigger word, rises step by step,
#: rises less than ``leak_share`` of that without the word, and at strength 1 at least ``kept`` of
#: the pictures keep their colours
LORA_TARGETS = dict(rise=0.15, leak_share=0.5, kept=0.8)


def lora_verdict(m: dict) -> dict:
    """``lora_measures``' result against ``LORA_TARGETS``: {"rise", "leak", "look" (rise and dial and
    leak met), "kept" (the picture kept at strength 1)}."""
    index = m["index"]
    rise, leak = index[1.0] - index[0.0], m["leak"] - m["base_plain"]
    levels = [index[s] for s in sorted(index)]
    look = (rise > LORA_TARGETS["rise"] and all(a < b for a, b in zip(levels, levels[1:]))
            and leak < LORA_TARGETS["leak_share"] * rise)
    return {"rise": rise, "leak": leak, "look": look, "kept": m["kept"][1.0] >= LORA_TARGETS["kept"]}


def lora_prompt(colour: str, shape: str, background: str, trigger: str = "") -> str:
    """One of ``LORA_PROMPTS`` as a caption, the trigger word first when given."""
    plain = f"一个{colour}的{shape}，{background}背景"
    return f"{trigger}，{plain}" if trigger else plain


def pastel_index(img) -> float:
    """How far the picture is lifted towards white: the mean of each pixel's smallest channel
    (0..1).  The world's pastel look (马卡龙色) mixes every colour 55% towards white."""
    return float(np.asarray(img, np.float32).min(axis=2).mean() / 255)


def unpastel(img, mix: float = W.PASTEL_MIX) -> np.ndarray:
    """The picture with a pastel lift of ``mix`` taken out again (``scenes.pastel`` inverted):
    a pastel render comes back as the world's own colours, which the judge reads."""
    a = np.asarray(img, np.float32)
    return np.clip((a - mix * 255) / (1 - mix), 0, 255).astype(np.uint8)


def keeps_content(img, colour: str, background: str, mixes=(0.0, W.PASTEL_MIX / 2, W.PASTEL_MIX)) -> bool:
    """Whether a styled picture still shows its prompt's shape colour and background under some
    pastel lift (none, half, full): the pastel index alone also rises for a washed-out picture
    whose shape is gone."""
    for mix in mixes:
        v = judge(unpastel(img, mix))
        if v.colour == colour and v.background == background:
            return True
    return False


def lesson_lora(profile, root, seed: int = 0, limit: int | None = None):
    """The tiny LoRA as notebooks 02 and 03 make it, with ``profile``'s settings, under ``root``:
    the path of its file.  ``limit``: how many synthetic source pictures notebook 02 makes
    (None: its own number)."""
    from kolors_course.data.build import Captions, build_training_set
    from kolors_course.lora.config import TrainConfig
    from kolors_course.lora.train import train_lora

    ds = build_training_set("synthetic", root / "ds", recipe=profile.recipe(),
                            captions=Captions(mode="source", trigger=profile.trigger_word),
                            synthetic_size=profile.width, limit=limit)
    cfg = TrainConfig.for_profile(profile, trigger_words=[profile.trigger_word], seed=seed)
    return train_lora(profile, ds.folder, root / "run", cfg).files["lora"]


def lora_measures(pipe, lora_path, trigger: str, strengths=(0.0, 0.5, 1.0, 1.5), seeds=(1, 2),
                  apply=None, keep=None) -> dict:
    """The LoRA lesson's measures on ``LORA_PROMPTS`` x ``seeds``, each picture made once:
    ``index`` (the pastel index at each strength, trigger word first), ``kept`` (the share of those
    pictures that still show the asked shape colour and background, ``keeps_content``: the index
    alone also rises when the look washes the shape out), ``leak`` and ``base_plain`` (the index
    without the trigger word at strength 1 and 0).  The pipeline's LoRA is left at strength 0.

    ``apply(strength)``: how to set the LoRA's strength, for adapters that are not in a file
    (``bench/experiments/locon_trial.py`` trains them in place); ``lora_path`` is then unused.
    ``keep``: a list that receives ``(strength, with_trigger, pictures)`` for each set made."""
    from kolors_course.generation.text2image import generate
    from kolors_course.lora.strength import set_lora_scale

    set_strength = apply or (lambda strength: set_lora_scale(pipe, lora_path, strength))

    def pictures(strength, with_trigger):
        set_strength(strength)
        pics = [(generate(pipe, lora_prompt(c, s, b, trigger if with_trigger else ""), seed=seed), c, b)
                for c, s, b in LORA_PROMPTS for seed in seeds]
        if keep is not None:
            keep.append((strength, with_trigger, [im for im, _, _ in pics]))
        return pics

    def mean_index(pics):
        return float(np.mean([pastel_index(im) for im, _, _ in pics]))

    out = {"index": {}, "kept": {}}
    try:
        for strength in strengths:
            pics = pictures(strength, True)
            out["index"][strength] = mean_index(pics)
            out["kept"][strength] = float(np.mean([keeps_content(im, c, b) for im, c, b in pics]))
        out["leak"] = mean_index(pictures(1.0, False))
        out["base_plain"] = mean_index(pictures(0.0, False))
    finally:
        set_strength(0.0)
    return out
