"""Every module the package imports at run time comes from a declared, non-extra dependency.

A learner's GPU notebook installs the kit with a plain ``pip install -e .`` (notebook
00), without the ``dev`` extra that holds the test runners; an import that only the
extra satisfies breaks their course (it once did: diffusers).  Imports guarded by
``try/except ImportError`` are optional and skipped.
"""
import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kolors_course"


def _requirements() -> list[str]:
    """From pyproject.toml (what a fresh clone installs), else the installed metadata."""
    try:
        import tomllib
    except ImportError:                 # Python 3.10
        return md.requires("kolors-course") or []
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [f"{r}; extra == \"{name}\"" for name, rs in project.get("optional-dependencies", {}).items()
              for r in rs]
    return list(project["dependencies"]) + extras


def _declared() -> tuple[set, set]:
    reqs = _requirements()
    norm = lambda r: re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-")
    main = {norm(r) for r in reqs if "extra ==" not in r}
    extra = {norm(r) for r in reqs if "extra ==" in r}
    return main, extra


def _optional_nodes(tree) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                getattr(h.type, "id", "") in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers if h.type is not None):
            out |= {id(n) for b in node.body for n in ast.walk(b)}
    return out


def _third_party_imports() -> dict[str, set]:
    found: dict[str, set] = {}
    for f in PACKAGE.rglob("*.py"):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        skip = _optional_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top != "kolors_course":
                    found.setdefault(top, set()).add(f.name)
    return found


def test_every_runtime_import_is_a_declared_dependency():
    main, extra = _declared()
    dists = md.packages_distributions()
    undeclared = {}
    for module, files in _third_party_imports().items():
        owners = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not owners & main:
            undeclared[module] = (sorted(owners), sorted(files), "only in an extra" if owners & extra else "")
    assert not undeclared, f"imported but not in project.dependencies: {undeclared}"


def test_the_dev_extra_holds_only_what_the_package_never_imports():
    main, extra = _declared()
    dists = md.packages_distributions()
    imported = set()
    for module in _third_party_imports():
        imported |= {d.lower().replace("_", "-") for d in dists.get(module, [module])}
    assert extra and not (extra & imported), extra & imported
