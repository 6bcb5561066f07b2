"""How closely a picture follows its condition: the numbers notebook 05 prints and the tests check.

- ``edge_overlap(image, edges)``: the F1 score of the picture's Canny edges against the
  condition's, an edge pixel counting as matched when the other map has an edge within
  ``tolerance`` pixels (3 by default: a generated outline is never pixel-exact).  The picture's
  edges are found with lower thresholds (30/60) than a condition's usual 100/200: a generated
  outline is softer than a drawn one (the tiny VAE paints shapes with edges a few pixels wide,
  which 100/200 misses entirely).  1 is the same outline, 0 none in common.
- ``colour_layout_error(image, colour_map)``: the mean distance (RGB units, 0-441) between the
  picture's coarse colour grid and the condition's.
"""
from __future__ import annotations

import numpy as np


def _edges(img, low: int, high: int) -> np.ndarray:
    from kolors_course.control.conditions import canny

    return np.asarray(canny(img.convert("RGB"), low, high))[..., 0] > 127


def _near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    import cv2

    k = 2 * tolerance + 1
    return cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8)) > 0


def edge_overlap(image, edges, tolerance: int = 3, low: int = 30, high: int = 60) -> float:
    """F1 of ``image``'s Canny edges (thresholds ``low``/``high``) against the edge map ``edges``
    (white on black, the same size)."""
    if image.size != edges.size:
        raise ValueError(f"the picture is {image.size} and the edge map {edges.size}: compare them at one size")
    got = _edges(image, low, high)
    want = np.asarray(edges.convert("L")) > 127
    if not want.any() or not got.any():
        return 0.0
    precision = float((got & _near(want, tolerance)).sum() / got.sum())
    recall = float((want & _near(got, tolerance)).sum() / want.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def colour_layout_error(image, colour_map, cells: int = 8) -> float:
    """Mean RGB distance between the ``cells`` x ``cells`` colour grids of ``image`` and ``colour_map``."""
    from PIL import Image

    if image.size != colour_map.size:
        raise ValueError(f"the picture is {image.size} and the colour map {colour_map.size}: compare them at one size")
    # the same box average as the colour condition (kolors_course.control.conditions.colour)
    a = np.asarray(image.convert("RGB").resize((cells, cells), Image.BOX), np.float32)
    b = np.asarray(colour_map.convert("RGB").resize((cells, cells), Image.BOX), np.float32)
    return float(np.linalg.norm(a - b, axis=-1).mean())
