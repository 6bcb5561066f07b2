"""The data set report: counts per stage, reasons, histograms and a preview grid."""
from __future__ import annotations

import json
from pathlib import Path

from kolors_course.data.clean import dropped_by_stage


def write_report(folder: Path, items_before, items_after, dropped, counts, sources: dict,
                 inputs: dict | None = None) -> dict:
    """``report/`` in ``folder``.  ``sources`` maps each item id to the path checked when
    the source folder was read (None when it was refused): the only paths opened here."""
    rep = folder / "report"
    rep.mkdir(parents=True, exist_ok=True)
    report = {
        "input": inputs or {},
        "counts": [{"stage": s, "left": n} for s, n in counts],
        "dropped": [{"id": d.id, "stage": d.stage, "reason": d.reason} for d in dropped],
        "kept": [{"id": it.id, "caption": it.caption, "size": [it.width, it.height],
                  "notes": it.notes} for it in items_after],
        "dropped_by_stage": dropped_by_stage(dropped),
    }
    (rep / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    plot_histograms(items_before, items_after, rep / "sizes.png")
    plot_preview(items_after, dropped, items_before, sources, rep / "preview.png")
    return report


def plot_histograms(before, after, path: Path):
    from kolors_course.core.images import new_figure

    fig = new_figure((11, 3))           # saved with the report, never shown
    axes = fig.subplots(1, 3)
    for ax, (title, fn) in zip(axes, [("width (px)", lambda it: it.width),
                                      ("height (px)", lambda it: it.height),
                                      ("aspect ratio (w/h)", lambda it: it.width / it.height)]):
        b = [fn(it) for it in before]
        a = [fn(it) for it in after]
        import numpy as np

        # one set of bin edges for both, so "kept" bars sit on "before" bars
        bins = np.histogram_bin_edges(b + a, bins=12) if b or a else 12
        ax.hist(b, bins=bins, alpha=0.5, label=f"before filters ({len(b)})")
        ax.hist(a, bins=bins, alpha=0.7, label=f"kept ({len(a)})")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_preview(kept, dropped, before, sources: dict, path: Path, n_kept: int = 8, n_dropped: int = 8):
    """Kept images (top) and dropped ones (bottom) with why; captions are in report.json.

    A dropped image is drawn from its checked path in ``sources``; a refused one
    (a metadata path outside the folder, None there) is shown as "not opened".
    """
    from kolors_course.core.images import new_figure
    from PIL import Image

    staged = {it.id: it.file for it in before}
    rows = [("kept", it.id, staged.get(it.id), f"kept: {it.width}x{it.height}") for it in kept[:n_kept]]
    drows = []
    for d in dropped[:n_dropped]:
        # never `source folder / id`: the id is the name as the metadata wrote it, and
        # "../../etc/passwd" joined to the folder is that file; `sources` holds None for it
        f = staged.get(d.id) or sources.get(d.id)
        kind = "dropped" if f is not None else "refused"
        drows.append((kind, d.id, f if f is not None and f.is_file() else None, f"{d.stage}: {d.reason}"))
    cols = max(len(rows), len(drows), 1)
    fig = new_figure((cols * 1.9, 2 * 2.3))
    axes = fig.subplots(2, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, group in enumerate((rows, drows)):
        for c, (kind, ident, f, label) in enumerate(group):
            ax = axes[r][c]
            img = None
            if f is not None:
                try:
                    with Image.open(f) as im:
                        img = im.convert("RGB").copy()
                except Exception:
                    img = None
            if img is not None:
                ax.imshow(img)
            else:
                ax.text(0.5, 0.5, "refused, not opened" if kind == "refused" else "unreadable",
                        ha="center", va="center", fontsize=8)
            ax.set_title(_wrap(f"{ident}\n{label}", 28), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def _wrap(text: str, width: int) -> str:
    """At most 5 lines of ``width``, broken between words where there are spaces (a long file name
    is still cut)."""
    import textwrap

    out = []
    for line in text.splitlines():
        out += textwrap.wrap(line, width, break_on_hyphens=False) or [""]
    return "\n".join(out[:5])


def preview_training_set(folder, n: int = 8, save_to=None):
    """A grid of the first ``n`` training images, labelled with their file names."""
    from PIL import Image

    from kolors_course.data.training_set import read_training_set
    from kolors_course.core.images import show_grid

    items = []
    for p, _ in read_training_set(folder)[:n]:
        with Image.open(p) as im:
            items.append((p.name, im.convert("RGB").copy()))
    return show_grid(items, cols=min(n, 8), title="first training images", save_to=save_to)
