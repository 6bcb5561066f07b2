"""Generating images: prompts, one image, sweeps.

Prompt anatomy (提示词), as the course teaches it, from general to specific:
subject (主体描述), details (细节描述), modifiers (修饰词), art style (艺术风格),
artist (艺术家).  Kolors reads Chinese natively, so the parts may be Chinese.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterable

from kolors_course.core.progress import inner_progress, progress
from kolors_course.models.pipeline import kit_pipeline

#: the course's shared negative prompt (反向提示词)
DEFAULT_NEGATIVE = "丑陋、变形、嘈杂、模糊、低对比度，扭曲的手指，多余的手指"


@dataclass
class PromptParts:
    subject: str = ""
    details: str = ""
    modifiers: str = ""
    style: str = ""
    artist: str = ""

    def compose(self, sep: str = "，") -> str:
        """Style first, as the course's prompts do, then the rest in order."""
        order = [self.style, self.subject, self.details, self.modifiers,
                 f"{self.artist}风格" if self.artist and not self.artist.endswith("风格") else self.artist]
        return sep.join(p.strip() for p in order if p and p.strip())

    def steps(self) -> list[tuple[str, str]]:
        """The prompt built up one part at a time: (part added, prompt so far)."""
        out, acc = [], PromptParts()
        for f in fields(self):
            value = getattr(self, f.name)
            if value:
                setattr(acc, f.name, value)
                out.append((f.name, acc.compose()))
        return out


def _check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % 64:
            raise ValueError(f"{name}={v!r}: Kolors needs a positive multiple of 64 "
                             "(e.g. 64 on the tiny profile, 1024 on kolors)")


def generate(pipe, prompt: str, negative_prompt: str = DEFAULT_NEGATIVE, seed: int = 0,
             cfg_scale: float | None = None, steps: int | None = None, height: int | None = None,
             width: int | None = None, control_image=None, control: str | None = None,
             control_strength: float | None = None, **pipe_kwargs):
    """One image.  Unset settings come from the profile the pipeline was loaded for.

    The same pipeline, prompt, seed and settings give the same image, bit for bit.

    Reference-image control (a pipeline loaded with ``controlnet=True``): ``control_image`` is a
    condition image (``kc.extract_condition(reference, control)``: white edges on black for
    ``canny``, a colour grid for ``colour``...), fitted to the output size; ``control`` names it
    (default ``canny``); ``control_strength`` scales what the ControlNet adds to the UNet (0: none,
    the plain picture; default 1: as trained; up to 2).
    """
    prof = kit_pipeline(pipe).profile
    cfg_scale = cfg_scale if cfg_scale is not None else prof.cfg_scale
    steps = steps if steps is not None else prof.steps
    height = height if height is not None else prof.height
    width = width if width is not None else prof.width
    _check_size(height, width)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: use a non-negative integer")
    if steps < 1:
        raise ValueError(f"steps={steps}: use at least 1")
    if "controlnet_image" in pipe_kwargs:
        raise TypeError("pass the condition as control_image= (with control= and control_strength=); "
                        "the kit hands it to DiffSynth")
    call = dict(prompt=prompt, negative_prompt=negative_prompt, cfg_scale=cfg_scale,
                num_inference_steps=steps, height=height, width=width, seed=seed,
                progress_bar_cmd=inner_progress, **pipe_kwargs)
    if control_image is None:
        if control is not None or control_strength is not None:
            raise ValueError("control= and control_strength= steer by a condition image: pass control_image= too")
        return pipe(**call)
    from kolors_course.control.steer import controlled_call

    return controlled_call(pipe, call, control_image, control or "canny",
                           1.0 if control_strength is None else control_strength)


def sweep(pipe, prompt: str, param: str, values: Iterable, negative_prompt: str = DEFAULT_NEGATIVE,
          seed: int = 0, **fixed):
    """The same prompt with one setting varied: returns ``[(label, image), ...]``.

    ``param`` is any argument of ``generate`` (``cfg_scale``, ``seed``, ``steps``,
    ``negative_prompt``...); everything else stays fixed, so the pictures differ
    only by that one knob.
    """
    values = list(values)
    out = []
    for v in progress(values, desc=f"{param} sweep"):
        kwargs = dict(fixed, negative_prompt=negative_prompt, seed=seed)
        kwargs[param] = v
        out.append((f"{param}={v}", generate(pipe, prompt, **kwargs)))
    return out
