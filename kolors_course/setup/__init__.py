"""Notebook 00 · Setup: the environment report, restart detection and the
torch-keeping install."""
