"""Notebook 01 · Text to image: ``generate``, ``sweep`` and ``PromptParts``
(``text2image``), and the prompt playground (``playground``)."""
