"""Installing the kit into the running kernel's environment, stdlib only.

It runs before the kit's dependencies exist, so it imports nothing beyond the
standard library.  The install keeps the torch already present: a GPU notebook
image ships a CUDA build of torch, and letting pip "upgrade" it would swap in a
multi-gigabyte build that may not match the driver.
"""
from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import tempfile
from pathlib import Path

KEEP = ("torch", "torchvision", "torchaudio")


def kit_source() -> Path:
    """The folder holding the kit's pyproject.toml (this file is kolors_course/install.py)."""
    return Path(__file__).resolve().parent.parent


def pinned_constraints() -> list[str]:
    """``name==version`` for the torch packages already installed, to keep them."""
    out = []
    for name in KEEP:
        try:
            out.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return out


def missing_requirements() -> list[str]:
    """Requirements of the kit that are not installed (empty when all are)."""
    try:
        reqs = md.requires("kolors-course") or []
    except md.PackageNotFoundError:
        return ["kolors-course"]
    missing = []
    for req in reqs:
        if "extra ==" in req:
            continue
        name = req.split(";")[0].strip()
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        try:
            md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    return missing


def pip_command(source: Path | None = None, extras: str = "", editable: bool = True,
                constraints_file: Path | None = None) -> list[str]:
    """The pip command, as an argument list (never a shell string)."""
    source = source or kit_source()
    target = f"{source}[{extras}]" if extras else str(source)
    cmd = [sys.executable, "-m", "pip", "install", "--progress-bar", "off"]
    if editable:
        cmd.append("-e")
    cmd.append(target)
    if constraints_file is not None:
        cmd += ["-c", str(constraints_file)]
    return cmd


def install_kit(extras: str = "", mode: str = "auto", dry_run: bool = False) -> bool:
    """Install the kit into this Python; returns True if pip ran.

    ``mode``: ``auto`` installs only when something is missing, ``always``
    re-installs, ``never`` only reports.
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError("mode must be 'auto', 'always' or 'never'")
    missing = missing_requirements()
    if mode == "never" or (mode == "auto" and not missing):
        print("The kit and its requirements are installed: nothing to do." if not missing
              else f"Not installing (mode='never'); missing: {', '.join(missing)}")
        return False
    keep = pinned_constraints()
    with tempfile.TemporaryDirectory() as tmp:
        cfile = Path(tmp) / "keep-torch.txt"
        cfile.write_text("\n".join(keep) + "\n")
        cmd = pip_command(extras=extras, constraints_file=cfile)
        print("Keeping the installed " + (", ".join(keep) if keep else "(no torch installed yet)"))
        print("Running:", " ".join(cmd))
        if dry_run:
            return False
        result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip exited with {result.returncode}; read its messages above. A common cause on "
            "GPU notebooks is a package that needs a newer torch than the one installed.")
    print("Installed. Now restart the kernel (Kernel > Restart) and run this notebook again.")
    return True
