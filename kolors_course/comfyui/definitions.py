"""Node definitions in ComfyUI's ``/object_info`` shape: loading them and reading one input's spec.

Two sources look alike on purpose: the shipped ``nodes.json`` (transcribed from the node
source, commits under ``_sources``) and the JSON a running ComfyUI answers at
``GET /object_info``.  They differ in one place: a file list.  A live answer lists the
user's files (``[["a.safetensors", ...], {...}]``); the shipped file cannot know them and
writes ``[[], {"file_list": "loras"}]`` instead, naming the ComfyUI folder, so that the
validator checks the name against the files a bundle ships (``files=``) rather than
against an empty list.  Newer ComfyUI versions may also answer a list as
``["COMBO", {"options": [...]}]``; both spellings are read here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

NODES_FILE = Path(__file__).with_name("nodes.json")

#: literal (widget) types; every other type name is something a link carries
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

#: the ComfyUI folder each file-list input reads, for a live /object_info answer (which does
#: not say): taken from the shipped definitions, plus these common names
FILE_INPUT_FOLDERS = {"lora_name": "loras", "unet_name": "unet", "vae_name": "vae",
                      "chatglm3_checkpoint": "LLM", "control_net_name": "controlnet", "ckpt_name": "checkpoints"}


class DefinitionsError(ValueError):
    """An ``object_info`` that is not in ComfyUI's shape."""


@dataclass(frozen=True)
class InputSpec:
    """One declared input of a node: ``type`` is a link type (``MODEL``...), a literal type
    (``INT``/``FLOAT``/``STRING``/``BOOLEAN``) or ``COMBO`` (a list of choices, ``choices``),
    ``file_list`` the ComfyUI folder when the choices are the user's files."""
    name: str
    type: str
    required: bool
    options: dict = field(default_factory=dict)
    choices: tuple | None = None
    file_list: str | None = None

    @property
    def is_widget(self) -> bool:
        """A value typed into the node (a widget in the editor), not a link."""
        return self.type in WIDGET_TYPES


def load_object_info(source=None) -> dict:
    """Node definitions: ``None`` for the shipped ``nodes.json``; a path to a JSON file (for
    example ``curl http://127.0.0.1:8188/object_info > object_info.json``); or a mapping (the
    parsed answer).  Keys starting with ``_`` (the shipped file's notes) are dropped."""
    if source is None:
        return dict(_shipped())
    if isinstance(source, (str, os.PathLike)):
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DefinitionsError(f"cannot read node definitions from {source}: {exc}") from None
    else:
        data = source
    if not isinstance(data, dict):
        raise DefinitionsError("node definitions must be a mapping of node class -> definition "
                               "(what ComfyUI answers at /object_info)")
    out = {}
    for name, d in data.items():
        if str(name).startswith("_"):
            continue
        if not isinstance(d, dict) or not isinstance(d.get("input", {}), dict):
            raise DefinitionsError(f"definition of {name!r} is not in /object_info shape "
                                   "({'input': {'required': ...}, 'output': [...], ...})")
        out[name] = d
    return out


@lru_cache(maxsize=1)
def _shipped() -> dict:
    return load_object_info(json.loads(NODES_FILE.read_text(encoding="utf-8")))


def shipped_sources() -> dict:
    """The ``_sources`` record of ``nodes.json``: repository, path and commit of each source."""
    return json.loads(NODES_FILE.read_text(encoding="utf-8"))["_sources"]


def _parse(name: str, raw, required: bool, class_type: str) -> InputSpec:
    # /object_info writes an input as [type] or [type, options]; JSON turns the tuple into a list
    if isinstance(raw, str):           # a hand-written definition may give the bare type name
        raw = [raw]
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DefinitionsError(f"{class_type}.{name}: input spec {raw!r} is not [type] or [type, options]")
    kind = raw[0]
    opts = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
    shipped_folder = opts.get("file_list")
    if isinstance(kind, (list, tuple)):
        choices = tuple(kind)
        if shipped_folder is not None:       # shipped file list: the names come from ``files=``
            choices = None
        return InputSpec(name, "COMBO", required, dict(opts), choices, shipped_folder or _live_folder(class_type, name))
    if kind == "COMBO":
        choices = opts.get("options")
        return InputSpec(name, "COMBO", required, dict(opts), tuple(choices) if choices is not None else None,
                         shipped_folder or _live_folder(class_type, name))
    return InputSpec(name, str(kind), required, dict(opts))


def _live_folder(class_type: str, name: str) -> str | None:
    """The folder of a file list in a live answer, which lists names but not their folder."""
    shipped = _shipped().get(class_type)
    if shipped:
        for section in ("required", "optional"):
            raw = shipped.get("input", {}).get(section, {}).get(name)
            if isinstance(raw, (list, tuple)) and len(raw) > 1 and isinstance(raw[1], dict):
                if raw[1].get("file_list"):
                    return raw[1]["file_list"]
    if class_type in ("LoadImage", "LoadImageMask") and name == "image":
        return "input"
    return FILE_INPUT_FOLDERS.get(name)


def input_specs(definition: dict, class_type: str = "?") -> list[InputSpec]:
    """Every declared input, required first then optional, each in declaration order (the
    order ComfyUI's editor lays widgets out in; ``input_order`` wins where the answer has it)."""
    inp = definition.get("input", {}) or {}
    order = definition.get("input_order", {}) or {}
    specs = []
    for section in ("required", "optional"):
        block = inp.get(section, {}) or {}
        names = [n for n in order.get(section, []) if n in block] or list(block)
        names += [n for n in block if n not in names]
        specs += [_parse(n, block[n], section == "required", class_type) for n in names]
    return specs


def outputs(definition: dict) -> list:
    return list(definition.get("output", []) or [])


def output_names(definition: dict) -> list:
    names = list(definition.get("output_name", []) or [])
    outs = outputs(definition)
    return names if len(names) == len(outs) else [str(o) for o in outs]


def is_output_node(definition: dict) -> bool:
    return bool(definition.get("output_node", False))
