"""Controlled generation: one DiffSynth call with the ControlNet-Union, a condition and a strength.

DiffSynth fixes a ControlNet's condition type and strength when the pipeline is built
(``ControlNetConfigUnit``), and builds each unit's annotator then, which imports
``controlnet_aux`` even for canny.  The kit loads the union model once
(``load_pipeline(controlnet=True)``) and, for each call, gives DiffSynth a one-unit
``MultiControlNetManager`` with that call's condition type and strength and no annotator
(the kit extracts conditions itself, ``kolors_course.control.conditions``); the pipeline's own
manager is put back afterwards, so a call without a control image runs exactly as before.
"""
from __future__ import annotations

import os

from kolors_course.control.conditions import CONDITIONS, PROCESSOR_IDS, ReferenceImageError, fit
from kolors_course.models.pipeline import kit_pipeline

MAX_STRENGTH = 2.0
#: an edge map (canny, soft edges) is mostly black; a picture passed by mistake is not
EDGE_MAP_MIN_DARK = 0.5
EDGE_MAPS = ("canny", "softedge")


def _condition_image(image, control: str, width: int, height: int):
    import numpy as np
    from PIL import Image

    from kolors_course.data.clean import to_rgb

    if isinstance(image, (str, os.PathLike)):
        from kolors_course.control.conditions import load_reference

        image, _ = load_reference(image)
    if not isinstance(image, Image.Image):
        raise ReferenceImageError(f"control_image is a condition image (a PIL image or a file), not "
                                  f"{type(image).__name__}: make one with kc.extract_condition(reference, {control!r})")
    image, _ = to_rgb(image)                   # 16-bit, palette, transparency: as for a reference
    if image.size != (width, height):
        # DiffSynth needs the output's size; crop, never stretch.  A colour grid keeps its hard cell
        # edges and its colours (nearest neighbour); resampling greys an edge map's thin lines
        image = fit(image, width, height, resample=Image.NEAREST if control == "colour" else None)
        if control == "canny":                 # white on black again
            image = Image.fromarray(np.where(np.asarray(image) > 64, 255, 0).astype(np.uint8))
    if control in EDGE_MAPS:
        dark = float((np.asarray(image.convert("L")) < 40).mean())
        if dark < EDGE_MAP_MIN_DARK:
            raise ReferenceImageError(
                f"control={control!r} expects an edge map (white lines on black), and this image is only "
                f"{dark:.0%} dark: it looks like the reference itself. Pass "
                f"kc.extract_condition(reference, {control!r}) as control_image.")
    return image


def reference_picture(pipe, reference, scene: dict):
    """Notebook 05's reference: the file ``reference`` (checked and fitted by ``load_reference``),
    or, when it is None, ``scene`` generated (``kc.scene_settings``: the story's scene, as notebook 04
    drew it); a file is fitted to the scene's size.  Returns ``(picture, notes)``; the notes say
    what was converted."""
    from kolors_course.control.conditions import load_reference
    from kolors_course.generation.text2image import generate

    if reference is None:
        return generate(pipe, **scene), ["generated from the story's scene"]
    return load_reference(reference, width=scene["width"], height=scene["height"])


def control_manager(model, control: str, strength: float):
    """DiffSynth's ControlNet manager for one call: the union ``model`` reading a ``control``
    condition (the union's processor id for it) at ``strength``, with no annotator."""
    from diffsynth.controlnets import Annotator, ControlNetUnit, MultiControlNetManager

    unit = ControlNetUnit(Annotator(PROCESSOR_IDS[control], skip_processor=True), model, float(strength))
    return MultiControlNetManager([unit])


def controlled_call(pipe, call: dict, control_image, control: str, strength: float):
    """``pipe(**call)`` steered by ``control_image`` (a condition of type ``control``)."""
    kit = kit_pipeline(pipe)
    if kit.controlnet_model is None:
        raise ValueError("this pipeline has no ControlNet: load it with kc.load_pipeline(prof, controlnet=True)")
    if control not in CONDITIONS:
        raise ValueError(f"unknown condition {control!r}: choose one of {sorted(CONDITIONS)}")
    learned = kit.controlnet_model.conditions
    if learned is not None and control not in learned:
        raise ValueError(f"this ControlNet was trained for {', '.join(learned)} only (the tiny profile's, on its "
                         f"toy world); {control!r} needs the real ControlNet-Union (profile 'kolors')")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"control_strength={strength!r}: use a number from 0 (no control) to {MAX_STRENGTH:g} "
                         "(1 is as trained)")
    image = _condition_image(control_image, control, call["width"], call["height"])
    if strength == 0:
        return pipe(**call)          # adds nothing: the plain picture, without the ControlNet's cost
    diffsynth = kit.diffsynth
    saved = diffsynth.controlnet
    manager = control_manager(kit.controlnet_model.model, control, strength)
    diffsynth.controlnet = manager
    try:
        return pipe(**call, controlnet_image=image)
    finally:
        if diffsynth.cpu_offload:
            manager.cpu()          # an interrupted call would leave it on the GPU, out of DiffSynth's sight
        diffsynth.controlnet = saved


def control_sweep(pipe, prompt: str, conditions: dict, strengths=(0.0, 0.5, 1.0), **settings) -> dict:
    """The same prompt and seed steered by each condition at each strength.

    ``conditions``: ``{name: condition image}`` (``canny``, ``colour``...; a ``None`` value, a
    condition that could not be extracted here, is skipped).  ``settings``: anything else
    ``kc.generate`` takes.  Returns ``{(name, strength): image}``; strength 0 is the plain
    picture, made once for all conditions.
    """
    from kolors_course.core.progress import progress
    from kolors_course.generation.text2image import generate

    if kit_pipeline(pipe).controlnet_model is None:
        print("this pipeline has no ControlNet (see the message where it was loaded): no controlled pictures")
        return {}
    jobs = [(name, s) for name, img in conditions.items() if img is not None for s in strengths]
    out, plain = {}, None
    for name, s in progress(jobs, desc="controlled generation"):
        if s == 0:
            plain = plain if plain is not None else generate(pipe, prompt, **settings)
            out[name, s] = plain
        else:
            out[name, s] = generate(pipe, prompt, control_image=conditions[name], control=name,
                                    control_strength=s, **settings)
    return out


def control_grid(conditions: dict, images: dict, save_to=None, title: str = "what each condition keeps"):
    """One row per condition: the condition, then the pictures at each strength (ASCII labels)."""
    from kolors_course.core.images import show_grid

    if not images:
        return None
    names = list(dict.fromkeys(name for name, _ in images))
    strengths = list(dict.fromkeys(s for _, s in images))
    items = []
    for name in names:
        items.append((f"{name} condition", conditions[name]))
        items += [(f"{name}, strength {s:g}", images[name, s]) for s in strengths]
    return show_grid(items, cols=1 + len(strengths), title=title, save_to=save_to)


def control_report(conditions: dict, images: dict, colour_cells: int = 8) -> dict:
    """How closely each picture follows its condition: ``{name: {strength: number}}`` with the
    edge overlap (F1, 1 = the same outline) for edge conditions and the colour-layout error
    (RGB distance, 0 = the same layout) for ``colour``; printed as one line per condition."""
    from kolors_course.control.measure import colour_layout_error, edge_overlap

    out: dict = {}
    for (name, s), img in images.items():
        if name == "colour":
            out.setdefault(name, {})[s] = colour_layout_error(img, conditions[name], colour_cells)
        elif name in EDGE_MAPS:
            out.setdefault(name, {})[s] = edge_overlap(img, conditions[name])
    for name, by_strength in out.items():
        what = "colour-layout error (0 = same layout)" if name == "colour" else "edge overlap (1 = same outline)"
        print(f"{name:<8} {what}: " + ", ".join(f"strength {s:g} -> {v:.2f}" for s, v in by_strength.items()))
    return out
