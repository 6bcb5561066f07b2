"""The caption editor of notebook 02 (ipywidgets).  Headless, it is built but never shown."""
from __future__ import annotations

import io
from pathlib import Path

from kolors_course.core.progress import in_notebook, is_headless


class CaptionEditor:
    """Browse the training set and edit captions.

    ``widget`` is what Jupyter shows; ``edits`` maps an image's file name to its edited
    caption; ``save()`` does what the Save button does: rewrite ``metadata.csv``
    atomically with the edits and return its path.
    """

    def __init__(self, dataset_dir):
        import ipywidgets as W

        from kolors_course.data.training_set import read_training_set

        self.dataset_dir = dataset_dir
        rows = read_training_set(dataset_dir)
        self.by_name = {p.name: (p, c) for p, c in rows}
        self.edits: dict[str, str] = {}
        self.pick = W.Dropdown(options=list(self.by_name), description="image")
        self.picture = W.Image(format="png", width=192)
        self.text = W.Textarea(description="caption", layout=W.Layout(width="95%"))
        self.button = W.Button(description="Save captions", button_style="success")
        self.status = W.Label()
        self.pick.observe(lambda _: self.show(), names="value")
        self.text.observe(self._on_text, names="value")
        self.button.on_click(lambda _: self.save())
        self.show()
        self.widget = W.VBox([self.pick, W.HBox([self.picture, self.text]), self.button, self.status])

    def show(self) -> None:
        """The picked image and its caption (as edited, if it was)."""
        from PIL import Image

        path, caption = self.by_name[self.pick.value]
        buf = io.BytesIO()
        with Image.open(path) as im:
            im.convert("RGB").resize((192, round(192 * im.height / im.width))).save(buf, "PNG")
        self.picture.value = buf.getvalue()
        self.text.value = self.edits.get(self.pick.value, caption)

    def _on_text(self, change) -> None:
        self.edits[self.pick.value] = change["new"]

    def save(self) -> Path:
        from kolors_course.data.training_set import save_captions

        meta = save_captions(self.dataset_dir, self.edits)
        self.status.value = f"saved {len(self.edits)} caption(s) to {meta.name}"
        return meta


def caption_editor(dataset_dir) -> CaptionEditor:
    """The caption editor for ``dataset_dir``, displayed in a live notebook."""
    ui = CaptionEditor(dataset_dir)
    if in_notebook() and not is_headless():
        from IPython.display import display

        display(ui.widget)
    else:
        print("Caption editor: open this notebook in Jupyter to use it (not shown in headless runs).")
    return ui
