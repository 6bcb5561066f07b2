"""The prompt playground of notebook 01 (ipywidgets).  Headless, it is built but never shown or run."""
from __future__ import annotations

from kolors_course.generation.text2image import DEFAULT_NEGATIVE, generate
from kolors_course.core.progress import in_notebook, is_headless
from kolors_course.models.pipeline import kit_pipeline


class Playground:
    """The prompt playground: ``widget`` (what Jupyter shows), the controls by name, and
    ``generate()``, which does what the Generate button does and returns the image (a test,
    or a learner in a plain Python shell, presses it this way)."""

    def __init__(self, pipe, prompt: str = "", negative_prompt: str = DEFAULT_NEGATIVE):
        import ipywidgets as W

        self.pipe = kit_pipeline(pipe)
        prof = self.pipe.profile
        self.prompt = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="95%"))
        self.negative_prompt = W.Textarea(value=negative_prompt, description="negative",
                                          layout=W.Layout(width="95%"))
        self.cfg_scale = W.FloatSlider(value=prof.cfg_scale, min=1.0, max=12.0, step=0.5, description="cfg_scale")
        self.steps = W.IntSlider(value=prof.steps, min=1, max=max(60, prof.steps), description="steps")
        self.seed = W.IntText(value=0, description="seed")
        self.button = W.Button(description="Generate", button_style="primary")
        self.output = W.Output()
        self.image = None                       # the last image made
        self.button.on_click(lambda _: self.generate())
        self.widget = W.VBox([self.prompt, self.negative_prompt,
                              W.HBox([self.cfg_scale, self.steps, self.seed]), self.button, self.output])

    def generate(self):
        """One image from the controls' current values, shown under the button."""
        from IPython.display import display

        with self.output:
            self.output.clear_output(wait=True)
            if not self.prompt.value.strip():
                print("Write a prompt first.")
                return None
            self.image = generate(self.pipe, self.prompt.value, negative_prompt=self.negative_prompt.value,
                                  cfg_scale=self.cfg_scale.value, steps=self.steps.value, seed=int(self.seed.value))
            display(self.image)
        return self.image


def prompt_playground(pipe, prompt: str = "", negative_prompt: str = DEFAULT_NEGATIVE) -> Playground:
    """Text boxes for the prompts, sliders for cfg_scale, steps and seed, and a button.

    Displayed only in a live notebook (headless runs build it and say so); nothing is
    generated until the button is clicked.
    """
    ui = Playground(pipe, prompt, negative_prompt)
    if in_notebook() and not is_headless():
        from IPython.display import display

        display(ui.widget)
    else:
        print("Prompt playground: open this notebook in Jupyter to use it (not shown in headless runs).")
    return ui
