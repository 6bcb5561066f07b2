"""Is the model hub reachable?  Asked once, fast, before anything tries to download."""
from __future__ import annotations

import os


def hub_unreachable(host: str = "www.modelscope.cn", timeout: float = 3.0) -> str | None:
    """None if the hub answers, else why not (one TCP connect, at most ``timeout`` seconds).

    Downloads (weights, data sets, the aesthetic predictor) ask this first, so that an
    offline machine gets a clear message in seconds instead of a library's retries."""
    import socket

    if os.environ.get("MODELSCOPE_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
        return "offline mode is set (MODELSCOPE_OFFLINE/HF_HUB_OFFLINE)"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot reach {host} ({exc.__class__.__name__}: {exc})"
