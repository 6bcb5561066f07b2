"""Notebook 03 · LoRA fine-tuning, and changing a LoRA's strength later.

``train`` holds the training loop (``train_lora``) and ``config`` its settings
(``TrainConfig``); ``files`` writes, reads and fuses LoRA files (DiffSynth and kohya
layouts); ``strength`` re-applies a LoRA at another strength on a loaded pipeline."""
