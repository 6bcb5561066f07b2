"""The caption editor of notebook 02 (ipywidgets).  Headless, it is built but never shown."""
from __future__ import annotations

from kolors_course.core.progress import in_notebook, is_headless


def caption_editor(dataset_dir):
    """Browse the training set and edit captions; Save writes ``metadata.csv`` atomically.

    Headless it is built (so it can be tested) but not displayed.
    """
    import io as _io

    import ipywidgets as W

    from kolors_course.data.build import read_training_set, save_captions

    rows = read_training_set(dataset_dir)
    edits: dict[str, str] = {}
    pick = W.Dropdown(options=[p.name for p, _ in rows], description="image")
    picture = W.Image(format="png", width=192)
    text = W.Textarea(description="caption", layout=W.Layout(width="95%"))
    save = W.Button(description="Save captions", button_style="success")
    status = W.Label()
    by_name = {p.name: (p, c) for p, c in rows}

    def show(_=None):
        p, cap = by_name[pick.value]
        from PIL import Image

        buf = _io.BytesIO()
        with Image.open(p) as im:
            im.convert("RGB").resize((192, round(192 * im.height / im.width))).save(buf, "PNG")
        picture.value = buf.getvalue()
        text.value = edits.get(pick.value, cap)

    def on_text(change):
        edits[pick.value] = change["new"]

    def on_save(_):
        meta = save_captions(dataset_dir, edits)
        status.value = f"saved {len(edits)} caption(s) to {meta.name}"

    pick.observe(show, names="value")
    text.observe(on_text, names="value")
    save.on_click(on_save)
    show()
    ui = W.VBox([pick, W.HBox([picture, text]), save, status])
    ui.kit_edits, ui.kit_save = edits, lambda: on_save(None)
    if in_notebook() and not is_headless():
        from IPython.display import display

        display(ui)
    else:
        print("Caption editor: open this notebook in Jupyter to use it (not shown in headless runs).")
    return ui
