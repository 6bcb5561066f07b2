"""Notebook 04 · The picture story: story files and their generation (``stories``),
the aesthetic score (``scoring``), and the grid, gallery and submission bundle
(``gallery``)."""
