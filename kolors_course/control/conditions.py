"""Reference-image conditions (参考图控制): what a ControlNet reads from a reference picture.

The course notes name five: pose (OpenPose), edges (Canny), soft edges (HED), depth
(MiDaS) and colour.  Two are plain image processing and run offline everywhere:

- ``canny``: OpenCV's Canny edge detector on each colour channel, white edges on black
  (the ControlNet convention); ``low``/``high`` are its hysteresis thresholds (a gradient
  above ``high`` starts an edge, one above ``low`` continues it).
- ``colour``: a coarse colour layout, the picture averaged over a ``cells`` x ``cells``
  grid and blown back up, so a model can follow where each colour goes without copying
  shapes.

Three need a trained network, the annotators of ``controlnet_aux`` (the package DiffSynth's
own processors import): ``depth`` (MiDaS), ``pose`` (OpenPose body keypoints) and
``softedge`` (HED).  Their weights come from the ``lllyasviel/Annotators`` files (ModelScope
mirror ``sd_lora/Annotators``) in a local folder; without the package or the folder each
gets an ``ConditionUnavailable`` error that says what to install or download, within a
second (no hub retries).

On an offline pose: among the registries' packages only ``mediapipe`` up to 0.10.14 ships a
pose network inside its wheel (``mediapipe/modules/pose_landmark/pose_landmark_full.tflite``,
6.4 MB, checked); its 1.x releases ship none and download models at run time, and 0.10.14
pins ``protobuf<5`` and brings jax/jaxlib, so the kit does not depend on it.  No registry
package ships MiDaS or HED weights.
"""
from __future__ import annotations

import os
from pathlib import Path

#: every condition the kit extracts, and what each needs
CONDITIONS = {
    "canny": "edges (OpenCV Canny), offline",
    "colour": "coarse colour layout, offline",
    "depth": "MiDaS depth (controlnet_aux + Annotators weights)",
    "pose": "OpenPose body keypoints (controlnet_aux + Annotators weights)",
    "softedge": "HED soft edges (controlnet_aux + Annotators weights)",
}
#: the DiffSynth / ControlNet-Union processor id each condition feeds
PROCESSOR_IDS = {"canny": "canny", "colour": "tile", "depth": "depth", "pose": "openpose", "softedge": "softedge"}
#: the smallest reference the kit accepts, and the widest aspect ratio
MIN_SIDE, MAX_ASPECT = 64, 4.0
ANNOTATORS_ID = "lllyasviel/Annotators"


class ReferenceImageError(ValueError):
    """A reference image the kit cannot use; the message says why and what to do."""


class ConditionUnavailable(RuntimeError):
    """A condition whose model is not installed or not downloaded; the message says how."""


def load_reference(image, width: int | None = None, height: int | None = None):
    """The reference as an RGB PIL image, optionally fitted to ``width`` x ``height``.

    ``image``: a path or a PIL image.  A missing, empty, corrupt or non-image file, one too
    small (under 64 px) or too elongated (over 4:1) is refused with the reason; greyscale,
    palette, CMYK and 16-bit pictures are converted and transparency is flattened on white
    (what a ControlNet sees), and each conversion is reported in ``notes``.
    Returns ``(image, notes)``.
    """
    from PIL import Image

    from kolors_course.data.clean import decode, to_rgb

    if isinstance(image, (str, os.PathLike)):
        from kolors_course.core.paths import project_path

        path = project_path(image)          # a relative path is the project's, wherever the kernel runs
        try:
            img, notes = decode(path)
        except ValueError as exc:
            raise ReferenceImageError(f"cannot use {path} as a reference image: {exc}. "
                                  "Choose a PNG or JPEG picture.") from None
    elif isinstance(image, Image.Image):
        img, notes = image, []
    else:
        raise ReferenceImageError(f"a reference image is a file path or a PIL image, not {type(image).__name__}")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ReferenceImageError(f"the reference is {w}x{h}: too small to read a condition from "
                              f"(at least {MIN_SIDE} px a side)")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ReferenceImageError(f"the reference is {w}x{h}: wider than {MAX_ASPECT:.0f}:1; crop it "
                              "to the part you want the picture to follow")
    img, more = to_rgb(img)
    notes = list(notes) + more
    if width or height:
        img = fit(img, width or img.width, height or img.height)
        notes.append(f"centre-cropped and resized to {img.width}x{img.height}")
    return img, notes


def fit(img, width: int, height: int, resample=None):
    """Centre-crop to the target's aspect ratio, then resize (``resample``: a PIL filter, LANCZOS
    unless given): the control image must have the output's size (DiffSynth's annotators keep the
    input's)."""
    from PIL import Image

    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % 64:
            raise ReferenceImageError(f"{name}={v!r}: Kolors needs a positive multiple of 64")
    w, h = img.size
    target = width / height
    if w / h > target:
        new_w = round(h * target)
        box = ((w - new_w) // 2, 0, (w - new_w) // 2 + new_w, h)
    else:
        new_h = round(w / target)
        box = (0, (h - new_h) // 2, w, (h - new_h) // 2 + new_h)
    return img.crop(box).resize((width, height), Image.LANCZOS if resample is None else resample)


# --- the offline conditions -------------------------------------------------------------------
def canny(img, low: int = 100, high: int = 200):
    """White edges on black, as an RGB image of the reference's size."""
    import cv2
    import numpy as np
    from PIL import Image

    if not 0 <= low < high:
        raise ValueError(f"canny thresholds low={low}, high={high}: use 0 <= low < high (e.g. 100, 200)")
    # each colour channel on its own, then combined: a red shape on a blue ground can have the
    # same brightness (grey levels 94 and 84), and a greyscale Canny would see no edge at all
    rgb = np.asarray(img.convert("RGB"))
    edges = np.max([cv2.Canny(np.ascontiguousarray(rgb[..., c]), low, high) for c in range(3)], axis=0)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def colour(img, cells: int = 8):
    """The reference's mean colour in each cell of a ``cells`` x ``cells`` grid, at its size."""
    from PIL import Image

    if not isinstance(cells, int) or not 1 <= cells <= min(img.size):
        raise ValueError(f"cells={cells!r}: use a whole number from 1 to the image's shorter side")
    return img.convert("RGB").resize((cells, cells), Image.BOX).resize(img.size, Image.NEAREST)


# --- the annotator conditions -------------------------------------------------------------------
def annotators_folder(profile=None) -> Path:
    """Where the annotator weights are looked for: ``KOLORS_COURSE_ANNOTATORS``, else
    ``<the profile's cache>/Annotators``."""
    env = os.environ.get("KOLORS_COURSE_ANNOTATORS")
    if env:
        return Path(env)
    from kolors_course.core.profiles import choose_profile

    profile = profile or choose_profile("tiny", verbose=False)
    return profile.cache_path / "Annotators"


_ANNOTATOR_FILES = {"depth": ("MidasDetector", "dpt_hybrid-midas-501f0c75.pt"),
                    "pose": ("OpenposeDetector", "body_pose_model.pth"),
                    "softedge": ("HEDdetector", "ControlNetHED.pth")}


def _annotator(name: str, folder: Path):
    cls_name, weight = _ANNOTATOR_FILES[name]
    try:
        import controlnet_aux
    except ImportError:
        raise ConditionUnavailable(
            f"the {name} condition needs the controlnet_aux package: `pip install controlnet-aux` "
            "(on a GPU notebook, whose torchvision matches its torch; on a fresh machine install "
            "torchvision for your torch first). canny and colour need nothing.") from None
    if not (folder / weight).is_file():
        raise ConditionUnavailable(
            f"the {name} condition needs the annotator weights {weight} in {folder}, and they are not "
            f"there. Download the {ANNOTATORS_ID} files (ModelScope mirror: sd_lora/Annotators) into that "
            "folder, or set KOLORS_COURSE_ANNOTATORS to where they are. canny and colour run offline.")
    detector = getattr(controlnet_aux, cls_name)
    return detector.from_pretrained(str(folder))


def annotate(img, name: str, folder: Path | None = None):
    """Depth, pose or soft edges through controlnet_aux, at the reference's size."""
    folder = Path(folder) if folder is not None else annotators_folder()
    detector = _annotator(name, folder)
    out = detector(img, detect_resolution=min(img.size), image_resolution=min(img.size))
    return out.convert("RGB").resize(img.size)


def extract_condition(img, name: str, **options):
    """The condition ``name`` (one of ``CONDITIONS``) of an RGB reference image."""
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}: choose one of {sorted(CONDITIONS)}")
    if name == "canny":
        return canny(img, **options)
    if name == "colour":
        return colour(img, **options)
    return annotate(img, name, **options)


def condition_grid(reference, names=("canny", "colour", "depth", "pose", "softedge"), save_to=None,
                   title: str = "the reference and its conditions", **options):
    """A labelled grid: the reference, then each condition; a condition that cannot run here
    shows a grey tile with the reason under it, printed in full below.  Returns
    ``(figure, {name: image or None}, {name: reason})``."""
    from PIL import Image

    from kolors_course.core.images import show_grid

    img = reference if isinstance(reference, Image.Image) else load_reference(reference)[0]
    items, made, why = [("reference", img)], {}, {}
    for name in names:
        try:
            made[name] = extract_condition(img, name, **options.get(name, {}))
            items.append((name, made[name]))
        except ConditionUnavailable as exc:
            made[name], why[name] = None, str(exc)
            items.append((f"{name}: not available here", Image.new("RGB", img.size, (200, 200, 200))))
    fig = show_grid(items, cols=len(items), title=title, save_to=save_to)
    by_reason: dict[str, list[str]] = {}        # one line for conditions missing the same thing
    for name, reason in why.items():
        by_reason.setdefault(reason.replace(f"the {name} condition needs", "these conditions need"), []).append(name)
    for reason, names in by_reason.items():
        print(f"{', '.join(names)}: {reason if len(names) > 1 else why[names[0]]}")
    return fig, made, why
