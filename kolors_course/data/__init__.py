"""Notebook 02 · Building a training set with data-juicer.

The data flows ``sources`` (where raw images come from) -> ``clean`` (decode, check,
normalise to RGB) -> ``recipe`` (the data-juicer filters, run and checked) ->
``build`` (captions, the training folder, swapped in atomically) -> ``report``
(counts, histograms, previews); ``caption_editor`` edits the captions afterwards."""
