"""An ipywidgets prompt playground.  Headless, it is built but never shown or run."""
from __future__ import annotations

from .text2image import DEFAULT_NEGATIVE, generate
from .bars import in_notebook, is_headless


def prompt_playground(pipe, prompt: str = "", negative_prompt: str = DEFAULT_NEGATIVE):
    """Text boxes for the prompts, sliders for cfg_scale, steps and seed, and a button.

    Returns the widget (so a test can inspect it); displays it only in a live
    notebook.  Nothing is generated until the button is clicked.
    """
    import ipywidgets as W

    prof = getattr(pipe, "kit_profile", None)
    box_prompt = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="95%"))
    box_neg = W.Textarea(value=negative_prompt, description="negative", layout=W.Layout(width="95%"))
    cfg = W.FloatSlider(value=prof.cfg_scale if prof else 4.0, min=1.0, max=12.0, step=0.5,
                        description="cfg_scale")
    steps = W.IntSlider(value=prof.steps if prof else 30, min=1, max=max(60, prof.steps if prof else 60),
                        description="steps")
    seed = W.IntText(value=0, description="seed")
    button = W.Button(description="Generate", button_style="primary")
    out = W.Output()

    def on_click(_):
        with out:
            out.clear_output(wait=True)
            if not box_prompt.value.strip():
                print("Write a prompt first.")
                return
            image = generate(pipe, box_prompt.value, negative_prompt=box_neg.value,
                             cfg_scale=cfg.value, steps=steps.value, seed=int(seed.value))
            from IPython.display import display

            display(image)

    button.on_click(on_click)
    ui = W.VBox([box_prompt, box_neg, W.HBox([cfg, steps, seed]), button, out])
    ui.kit_generate = lambda: on_click(None)   # lets a test press the button
    if in_notebook() and not is_headless():
        from IPython.display import display

        display(ui)
    else:
        print("Prompt playground: open this notebook in Jupyter to use it (not shown in headless runs).")
    return ui


def caption_editor(dataset_dir):
    """Browse the training set and edit captions; Save writes ``metadata.csv`` atomically.

    Headless it is built (so it can be tested) but not displayed.
    """
    import io as _io

    import ipywidgets as W

    from .dataset import read_training_set, save_captions

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
