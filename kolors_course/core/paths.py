"""Where things live: every path the kit writes is resolved against the project root.

Notebooks run with the working directory set to ``notebooks/`` when a learner
opens them and to the project root in headless runs; resolving everything
against one root keeps the two identical and keeps machine-specific absolute
paths out of notebooks and configs.
"""
from __future__ import annotations

import os
from pathlib import Path

_MARKERS = ("pyproject.toml", "notebooks")


def project_root() -> Path:
    """The kit's project folder.

    ``KOLORS_COURSE_HOME`` wins; otherwise the nearest folder at or above the
    working directory that holds the kit's ``pyproject.toml`` and ``notebooks/``;
    otherwise the working directory itself (a pip-installed kit used elsewhere).
    """
    env = os.environ.get("KOLORS_COURSE_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if all((folder / m).exists() for m in _MARKERS):
            return folder
    return here


def project_path(*parts: str | os.PathLike) -> Path:
    """A path under the project root (absolute paths are returned unchanged)."""
    p = Path(*parts).expanduser()
    return p if p.is_absolute() else project_root() / p


def inside(base: str | os.PathLike, candidate: str | os.PathLike) -> Path:
    """Resolve ``candidate`` relative to ``base`` and refuse anything that escapes it.

    Used for every path read from user data (metadata files, story files):
    ``../../etc/passwd`` or a symlink out of the dataset is an error, not a read.
    """
    base_r = Path(base).resolve()
    cand = Path(candidate)
    full = (cand if cand.is_absolute() else base_r / cand).resolve()
    if full != base_r and base_r not in full.parents:
        raise ValueError(
            f"path {str(candidate)!r} points outside {str(base_r)!r}; "
            "keep every file inside the folder you chose"
        )
    return full


def relative_to_root(path: str | os.PathLike) -> str:
    """A path for display and for files we write: relative to the project when possible."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(project_root()))
    except ValueError:
        return str(p)
