"""Progress bars that suit where the code runs.

In a live notebook: tqdm's widget bar.  In a terminal: a normal bar.  In a
headless run (papermill, CI; ``KOLORS_COURSE_HEADLESS=1``, set by the kit's
runner): a plain-text bar that updates at most every 30 seconds, so logs get a
few lines per loop instead of thousands of carriage returns.
"""
from __future__ import annotations

import os
import sys


def is_headless() -> bool:
    if os.environ.get("KOLORS_COURSE_HEADLESS", "") not in ("", "0"):
        return True
    return False


def in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and ip.__class__.__name__ == "ZMQInteractiveShell"


def progress(iterable=None, desc: str = "", total: int | None = None, leave: bool = True, **kw):
    """tqdm, configured for the current environment."""
    if is_headless():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, leave=leave, mininterval=30.0, ascii=True,
                    ncols=80, file=sys.stdout, dynamic_ncols=False, **kw)
    if in_notebook():
        try:
            from tqdm.notebook import tqdm as ntqdm

            return ntqdm(iterable, desc=desc, total=total, leave=leave, **kw)
        except ImportError:
            pass
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, **kw)


def inner_progress(iterable, **kw):
    """For loops inside a loop (denoising steps of one image): silent when headless."""
    if is_headless():
        return iterable
    return progress(iterable, leave=False, **kw)
