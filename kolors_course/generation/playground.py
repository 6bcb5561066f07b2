"""The prompt playground of notebook 01 (ipywidgets).  Headless, it is built but never shown or run."""
from __future__ import annotations

from kolors_course.generation.text2image import DEFAULT_NEGATIVE, generate
from kolors_course.core.progress import in_notebook, is_headless
from kolors_course.models.pipeline import kit_pipeline


def prompt_playground(pipe, prompt: str = "", negative_prompt: str = DEFAULT_NEGATIVE):
    """Text boxes for the prompts, sliders for cfg_scale, steps and seed, and a button.

    Returns the widget (so a test can inspect it); displays it only in a live
    notebook.  Nothing is generated until the button is clicked.
    """
    import ipywidgets as W

    prof = kit_pipeline(pipe).profile
    box_prompt = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="95%"))
    box_neg = W.Textarea(value=negative_prompt, description="negative", layout=W.Layout(width="95%"))
    cfg = W.FloatSlider(value=prof.cfg_scale, min=1.0, max=12.0, step=0.5,
                        description="cfg_scale")
    steps = W.IntSlider(value=prof.steps, min=1, max=max(60, prof.steps),
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
