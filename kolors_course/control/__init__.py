"""Notebook 05 · Reference-image control: the conditions a ControlNet reads from a reference
picture (``conditions``: canny and colour offline; depth, pose and soft edges through
controlnet_aux's annotators)."""
