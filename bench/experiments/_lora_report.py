"""What the LoRA experiments beside this file print: ``evaluate.lora_measures``' result, one line per
strength, and the trigger-word pictures as a grid when asked."""
import numpy as np


def report(m: dict, keep: list, grid) -> None:
    """One line per measure, as ``lora_measures`` returns them; the trigger-word pictures at
    0 / 0.5 / 1 as a grid when asked."""
    for strength, index in m["index"].items():
        print(f"strength {strength:g} with the trigger word: pastel index {index:.2f}, "
              f"colours kept {m['kept'][strength]:.0%}")
    print(f"without the trigger word: pastel index {m['base_plain']:.2f} at strength 0, {m['leak']:.2f} at 1")
    save_grid(keep, grid)


def save_grid(keep: list, grid) -> None:
    """The trigger-word pictures at 0 / 0.5 / 1, one row per strength, to ``grid`` (if given)."""
    if grid:
        from PIL import Image

        rows = [np.concatenate([np.asarray(im) for im in pics], 1)
                for strength, with_trigger, pics in keep if with_trigger and strength <= 1.0]
        Image.fromarray(np.concatenate(rows, 0)).save(grid)
