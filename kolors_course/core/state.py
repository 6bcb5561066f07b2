"""Process-wide state, changed only for as long as a call needs it.

A notebook kernel lives for a whole lesson: a working directory, an environment
variable, a library flag or the global random generator left changed by one cell
changes what every later cell (the learner's own code included) does.  Every place
in the kit that must change such state does it through one of these context
managers, which put back exactly what was there before, on success and on error
(``tests/test_state.py`` checks each one, and the kit's calls that use them).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

_UNSET = object()


@contextlib.contextmanager
def environ(**changes: str | None):
    """Set (a string) or remove (``None``) environment variables; restore them after.

    Child processes started inside the block (notebook kernels, data-juicer
    workers) inherit the changed values, which is why the kit sets them here
    rather than passing them around.
    """
    before = {k: os.environ.get(k, _UNSET) for k in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = str(value)
        yield
    finally:
        for key, value in before.items():
            if value is _UNSET:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def environ_default(**defaults: str):
    """Like ``environ`` but only for variables that are not set: a learner's own
    setting (``HF_HUB_OFFLINE=0`` to allow the hub, say) wins."""
    with environ(**{k: v for k, v in defaults.items() if k not in os.environ}):
        yield


@contextlib.contextmanager
def working_directory(path: str | os.PathLike):
    """``os.chdir(path)`` for the block (data-juicer resolves a recipe's relative paths
    against the working directory), then back."""
    old = os.getcwd()
    os.chdir(Path(path))
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def pillow_strict_decoding():
    """Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` off for the block.

    data-juicer (and parts of modelscope) switch it on for the whole process when
    imported, which makes Pillow pad a truncated file with grey instead of failing:
    the kit's image checks need the failure, the learner's session keeps its flag.
    """
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


@contextlib.contextmanager
def torch_global_seed(seed: int):
    """Seed torch's global CPU generator for code that draws from it (a library's
    ``__init__``, for one); the generator's previous state is restored after, so a
    learner's ``torch.rand`` sequence goes on as if the block never ran."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


@contextlib.contextmanager
def torch_default_dtype(dtype):
    """``torch.set_default_dtype`` for the block (building a model directly in bfloat16)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def loguru_handler_ids() -> set[int]:
    """The ids of loguru's current handlers.

    loguru has no public call that lists handlers; its logger keeps them in
    ``logger._core.handlers`` (stable since 0.4).  Read here, in one place, and only read.
    """
    from loguru import logger

    core = getattr(logger, "_core", None)
    return set(getattr(core, "handlers", {}) or {})


@contextlib.contextmanager
def loguru_handlers_scoped():
    """Handlers a library adds to loguru inside the block (data-juicer opens log files in its
    work folder and never closes them) are removed when it ends, so no file stays open
    and no later log line goes to a folder that has since been moved or deleted."""
    from loguru import logger

    before = loguru_handler_ids()
    try:
        yield
    finally:
        for hid in loguru_handler_ids() - before:
            with contextlib.suppress(ValueError):
                logger.remove(hid)


@contextlib.contextmanager
def loguru_disabled(name: str):
    """``logger.disable(name)`` for the block, then enabled again."""
    from loguru import logger

    logger.disable(name)
    try:
        yield
    finally:
        logger.enable(name)
