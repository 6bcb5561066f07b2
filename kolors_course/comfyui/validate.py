"""Check a ComfyUI workflow before ComfyUI sees it, with the checks ComfyUI's own
``/prompt`` validation makes, against the node definitions.

``validate_workflow(workflow, object_info=None, files=None)`` returns the problems (an
empty list: valid); ``check_workflow`` raises ``WorkflowError`` listing all of them.

- ``workflow``: the API format (``{"7": {"class_type": "KSampler", "inputs": {...}}}``) or
  the editor's UI format (``nodes``/``links``...), which is converted to the API format
  first (see ``uiformat.ui_to_api`` for what that conversion supports).
- ``object_info``: ``None`` for the shipped ``nodes.json``, or a running ComfyUI's
  ``GET /object_info`` answer (a parsed mapping or the path of a saved JSON file): then
  its lists are the user's real sampler names and files.
- ``files``: ``{"loras": ["lora_kohya.safetensors"], "input": [...], ...}``, the files a
  bundle ships or a user has, per ComfyUI folder; each file-list input whose folder is in
  the mapping must name one of them (folders not in the mapping are not checked).

Checks: every ``class_type`` is defined; every required input is given; a literal has
the input's type and lies within its min/max (ComfyUI checks no ``step``, nor does this),
is in the list of a COMBO input, names a file of ``files``; a link ``["id", slot]``
points to a node of the workflow, to an output slot that node has, and that output's
type is the input's type; the workflow has an output node (``output_node``: SaveImage).
Inputs a definition does not declare are ignored, as ComfyUI ignores them.  One check is
stricter than ComfyUI: an INT must be a JSON integer (ComfyUI would truncate 50.7 to 50
without a word), and a literal must have its JSON type (no "50" for 50).
"""
from __future__ import annotations

import json
import math
import sys

from kolors_course.comfyui.definitions import (DefinitionsError, input_specs, is_output_node, load_object_info,
                                               outputs)


class WorkflowError(ValueError):
    """A workflow ComfyUI would reject; ``problems`` lists every reason."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("the workflow is not valid:\n  - " + "\n  - ".join(self.problems))


def is_ui_format(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow


def _label(node_id, node) -> str:
    cls = node.get("class_type") if isinstance(node, dict) else None
    return f"node {node_id} ({cls})" if cls else f"node {node_id}"


def _is_link(value) -> bool:
    # what the API format uses for a link: [source node id, output slot]
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (str, int))
            and not isinstance(value[0], bool) and isinstance(value[1], int) and not isinstance(value[1], bool))


def _types_match(out_type, in_type) -> bool:
    """ComfyUI's rule (comfy_execution validate_node_input): equal names, '*' accepts
    anything, and 'A,B' is a set of types; a list output feeds a COMBO input."""
    if isinstance(out_type, (list, tuple)):
        return in_type == "COMBO"
    out_type, in_type = str(out_type), str(in_type)
    if out_type == in_type or "*" in (out_type, in_type):
        return True
    outs = {t.strip() for t in out_type.split(",")}
    ins = {t.strip() for t in in_type.split(",")}
    return outs <= ins


def _check_literal(where: str, spec, value, files) -> list[str]:
    o = spec.options
    if spec.type == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return [f"{where} must be an integer, got {value!r}"]
    elif spec.type == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return [f"{where} must be a number, got {value!r}"]
    elif spec.type == "STRING":
        return [] if isinstance(value, str) else [f"{where} must be text, got {value!r}"]
    elif spec.type == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where} must be true or false, got {value!r}"]
    elif spec.type == "COMBO":
        return _check_choice(where, spec, value, files)
    if "min" in o and value < o["min"]:
        return [f"{where} = {value!r} is below its minimum {o['min']!r}"]
    if "max" in o and value > o["max"]:
        return [f"{where} = {value!r} is above its maximum {o['max']!r}"]
    return []


def _check_choice(where: str, spec, value, files) -> list[str]:
    if not isinstance(value, str):
        return [f"{where} must be one of its listed names, got {value!r}"]
    folder = spec.file_list
    if spec.choices is not None and value not in spec.choices:
        shown = ", ".join(map(repr, spec.choices[:12])) + (", ..." if len(spec.choices) > 12 else "")
        hint = (f" (a file list: put the file into ComfyUI's {_folder_path(folder)} folder and refresh)"
                if folder else "")
        return [f"{where} = {value!r} is not in its list [{shown}]{hint}"]
    suffix = spec.options.get("file_suffix")
    if suffix and not value.endswith(suffix):
        return [f"{where} = {value!r}: this loader only lists files ending in {suffix!r}"]
    if folder and files is not None and folder in files:
        have = sorted(files[folder])
        if value not in have:
            return [f"{where} = {value!r} is not among the files for ComfyUI's {_folder_path(folder)} folder "
                    f"(have: {', '.join(have) or 'none'})"]
    return []


def _folder_path(folder) -> str:
    return "input" if folder == "input" else f"models/{folder}"


def validate_workflow(workflow, object_info=None, files=None) -> list[str]:
    """Every problem ComfyUI would report for ``workflow``; ``[]`` when it is valid."""
    try:
        defs = load_object_info(object_info)
    except DefinitionsError as exc:
        return [str(exc)]
    problems = []
    if is_ui_format(workflow):
        from kolors_course.comfyui.uiformat import ui_to_api

        workflow, conversion = ui_to_api(workflow, defs)
        problems += conversion
    if not isinstance(workflow, dict) or not workflow:
        return problems + ["a workflow in API format is a non-empty mapping of node id -> "
                           "{'class_type': ..., 'inputs': {...}}"]
    has_output = False
    for node_id, node in workflow.items():
        label = _label(node_id, node)
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            problems.append(f"{label} has no class_type")
            continue
        cls = node["class_type"]
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            problems.append(f"{label}: 'inputs' must be a mapping of input name -> value or link")
            continue
        definition = defs.get(cls)
        if definition is None:
            problems.append(f"{label}: unknown node class {cls!r}; no definition for it (is the custom node "
                            "that provides it installed, and its name spelled as it registers it?)")
            continue
        has_output = has_output or is_output_node(definition)
        try:
            specs = input_specs(definition, cls)
        except DefinitionsError as exc:
            problems.append(str(exc))
            continue
        for spec in specs:
            where = f"{label} input {spec.name!r}"
            if spec.name not in inputs:
                if spec.required:
                    problems.append(f"{label}: required input {spec.name!r} is missing")
                continue
            value = inputs[spec.name]
            if _is_link(value):
                problems += _check_link(where, spec, value, workflow, defs)
            elif not spec.is_widget:
                problems.append(f"{where} needs a link to a {spec.type} output (['node id', slot]), "
                                f"got {value!r}")
            else:
                problems += _check_literal(where, spec, value, files)
    if not has_output:
        problems.append("the workflow has no output node (such as SaveImage): ComfyUI refuses it with "
                        "'Prompt has no outputs'")
    return problems


def _check_link(where: str, spec, link, workflow, defs) -> list[str]:
    src_id, slot = str(link[0]), link[1]
    source = workflow.get(src_id)
    if source is None:
        return [f"{where} links to node {src_id!r}, which is not in the workflow"]
    if not isinstance(source, dict):
        return []                      # reported where that node itself is checked
    src_def = defs.get(source.get("class_type"))
    if src_def is None:
        return []                      # its unknown class is reported once, at that node
    outs = outputs(src_def)
    if not 0 <= slot < len(outs):
        return [f"{where} links to output slot {slot} of {_label(src_id, source)}, which has "
                f"{len(outs)} output(s)"]
    if not _types_match(outs[slot], spec.type):
        return [f"{where} expects {spec.type} but is linked to {_label(src_id, source)} output {slot}, "
                f"which is {outs[slot]}"]
    return []


def check_workflow(workflow, object_info=None, files=None):
    """``workflow`` when valid; otherwise ``WorkflowError`` listing every problem."""
    problems = validate_workflow(workflow, object_info=object_info, files=files)
    if problems:
        raise WorkflowError(problems)
    return workflow


def main(argv=None) -> int:
    """``python -m kolors_course.comfyui.validate WORKFLOW.json [OBJECT_INFO.json]``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or len(argv) > 2:
        print("usage: python -m kolors_course.comfyui.validate WORKFLOW.json [OBJECT_INFO.json]\n"
              "  OBJECT_INFO.json: a running ComfyUI's answer, e.g.\n"
              "  curl http://127.0.0.1:8188/object_info > object_info.json\n"
              "  (without it: the definitions shipped with the kit)")
        return 2
    with open(argv[0], encoding="utf-8") as f:
        workflow = json.load(f)
    problems = validate_workflow(workflow, object_info=argv[1] if len(argv) > 1 else None)
    for p in problems:
        print(f"- {p}")
    print(f"{argv[0]}: {'valid' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
