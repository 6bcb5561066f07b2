"""Image grids: PIL grids for files, matplotlib figures for notebooks."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence


def image_grid(images: Sequence, rows: int | None = None, cols: int | None = None,
               pad: int = 4, background=(255, 255, 255)):
    """Paste images into one PIL image, row by row (sizes may differ)."""
    from PIL import Image

    if not images:
        raise ValueError("image_grid got no images")
    n = len(images)
    cols = cols or (math.ceil(n / rows) if rows else math.ceil(math.sqrt(n)))
    rows = rows or math.ceil(n / cols)
    if rows * cols < n:
        raise ValueError(f"a {rows}x{cols} grid cannot hold {n} images")
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def new_figure(figsize, shown: bool = False):
    """A matplotlib figure that leaves matplotlib's backend as it was (switching it to Agg once
    hid every later figure of a notebook).  ``shown`` and in a notebook: pyplot's, so the inline
    backend shows it under the cell; otherwise a pyplot-free ``Figure`` to save (no window, and
    nothing piles up in pyplot's list of open figures)."""
    if shown and _interactive():
        import matplotlib.pyplot as plt

        return plt.figure(figsize=figsize)
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def show_grid(items: Sequence, cols: int | None = None, title: str = "", save_to=None,
              cell_inches: float = 2.2, fontsize: int = 8):
    """A labelled matplotlib grid of ``[(label, image), ...]``; optionally saved as PNG.

    Labels are drawn by matplotlib, so they may be Chinese only where a CJK
    font exists; keep labels in ASCII (``cfg_scale=4``) and show Chinese
    prompts as text instead.  In a notebook the figure is pyplot's (shown under
    the cell); elsewhere it is a pyplot-free ``Figure`` (``save_to`` or
    ``fig.savefig`` keeps it), and matplotlib's backend is never switched.
    """
    n = len(items)
    if n == 0:
        raise ValueError("show_grid got nothing to show")
    # up to 6 in one row (a 5-value sweep once left its last picture alone on a second row);
    # more in rows of 4
    cols = cols or (n if n <= 6 else 4)
    rows = math.ceil(n / cols)
    fig = new_figure((cols * cell_inches, rows * cell_inches + 0.4), shown=True)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, im) in zip(axes.flat, items):
        ax.imshow(im)
        ax.set_title(str(label), fontsize=fontsize)
    if title:
        fig.suptitle(title, fontsize=fontsize + 2)
    fig.tight_layout()
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save_to, dpi=100)
    return fig


def _interactive() -> bool:
    from kolors_course.core.progress import in_notebook

    return in_notebook()


def save_images(items: Sequence, folder, prefix: str = "") -> list[Path]:
    """Save ``[(label, image), ...]`` as PNGs named after their labels."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (label, im) in enumerate(items):
        safe = "".join(ch if ch.isalnum() or ch in "._-=" else "_" for ch in str(label))
        p = folder / f"{prefix}{i:02d}_{safe}.png"
        im.save(p)
        paths.append(p)
    return paths
