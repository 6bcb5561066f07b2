"""What this kernel runs on, and whether it must be restarted.

Why a restart (重启内核)?  ``pip install`` changes files on disk, but a running
Python keeps the modules it already imported in memory, and it reads the list
of installed packages (``.pth`` files, editable installs) only at start.  After
installing or upgrading something this kernel already imported, the old code
keeps running until the kernel restarts.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import platform
import shutil
import sys
from dataclasses import dataclass

from kolors_course.core.progress import in_notebook, is_headless

#: distribution name -> import name, for the packages the course relies on
KEY_PACKAGES = {
    "torch": "torch", "diffsynth": "diffsynth", "transformers": "transformers",
    "py-data-juicer": "data_juicer", "modelscope": "modelscope", "peft": "peft",
    "accelerate": "accelerate", "safetensors": "safetensors", "papermill": "papermill",
    "ipywidgets": "ipywidgets", "matplotlib": "matplotlib", "kolors-course": "kolors_course",
}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def environment_report(path: str = ".") -> dict:
    """Python, torch, CUDA and GPU, free disk and key package versions."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "executable": sys.executable,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda_build"] = torch.version.cuda or "cpu-only build"
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpu_memory_gb"] = round(p.total_memory / 2**30, 1)
            free, _ = torch.cuda.mem_get_info()
            info["gpu_free_gb"] = round(free / 2**30, 1)
    except ImportError:
        info["torch"] = None
    info["disk_free_gb"] = round(shutil.disk_usage(path).free / 2**30, 1)
    info["packages"] = {d: _version(d) for d in KEY_PACKAGES}
    return info


def print_environment_report(report: dict | None = None) -> dict:
    r = report or environment_report()
    rows = [("Python", r["python"]), ("platform", r["platform"]),
            ("torch", f"{r['torch']} ({r.get('torch_cuda_build', '?')})" if r.get("torch") else "NOT INSTALLED"),
            ("CUDA GPU", f"{r['gpu']} ({r['gpu_memory_gb']} GB, {r['gpu_free_gb']} GB free)"
             if r.get("cuda_available") else "none visible: the tiny profile will be used"),
            ("free disk", f"{r['disk_free_gb']} GB")]
    # torch has its row above, with its CUDA build (the package list's torch is the same install)
    rows += [(k, v or "NOT INSTALLED") for k, v in r["packages"].items() if k != "torch"]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return r


@dataclass
class RestartReason:
    package: str
    why: str

    def __str__(self):
        return f"{self.package}: {self.why}"


def restart_reasons() -> list[RestartReason]:
    """Packages whose code on disk differs from what this kernel has loaded."""
    importlib.invalidate_caches()
    reasons = []
    for dist, mod_name in KEY_PACKAGES.items():
        on_disk = _version(dist)
        mod = sys.modules.get(mod_name)
        if mod is not None:
            loaded = getattr(mod, "__version__", None)
            if on_disk is None:
                reasons.append(RestartReason(dist, "was imported, but is no longer installed"))
            elif loaded and _norm(loaded) != _norm(on_disk):
                reasons.append(RestartReason(dist, f"version {loaded} is loaded, {on_disk} is installed"))
        elif on_disk is not None and importlib.util.find_spec(mod_name) is None:
            reasons.append(RestartReason(dist, "is installed, but this kernel cannot import it yet"))
    return reasons


def _norm(v: str) -> str:
    return v.split("+")[0]


def needs_restart(verbose: bool = True) -> bool:
    reasons = restart_reasons()
    if verbose:
        if reasons:
            print("Restart the kernel (Kernel > Restart, 重启内核) before going on, because:")
            for r in reasons:
                print(f"  - {r}")
        else:
            print("No restart needed: every package this kernel uses is the one installed.")
    return bool(reasons)


def restart_kernel(force: bool = False) -> bool:
    """Restart the Jupyter kernel (interactive use only).

    Never restarts a headless run (papermill, CI): it would kill the run.
    Returns True if a restart was requested.
    """
    if is_headless() or not in_notebook():
        print("Not restarting: this is not an interactive Jupyter kernel "
              "(a headless run starts a fresh kernel for every notebook anyway).")
        return False
    if not force and not restart_reasons():
        print("No restart needed.")
        return False
    from IPython import get_ipython

    print("Restarting the kernel... run the notebook again from the top afterwards.")
    get_ipython().kernel.do_shutdown(restart=True)
    return True
