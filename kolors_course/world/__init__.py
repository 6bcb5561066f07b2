"""A small synthetic world that the tiny profile's models learn.

``scenes``   the world: coloured shapes on coloured backgrounds, drawn with PIL,
             with varied Chinese captions (the single colour table of the kit).
``judge``    reads a generated picture back into the world's terms (colours,
             shape, position, size, style, painter), by classical image analysis.
``train_vae`` / ``train_unet``  the two training loops; ``build`` runs both and
             writes the files the tiny profile ships; ``evaluate`` measures what a
             pipeline does with prompts, negative prompts, cfg and unknown words.
"""
