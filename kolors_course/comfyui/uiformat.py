"""The editor's workflow format (what "Save" writes and what dropping a file onto the
canvas loads) from the API format, and back.

UI format (LiteGraph, ``version`` 0.4)::

    {"last_node_id": 10, "last_link_id": 12,
     "nodes": [{"id": 7, "type": "KSampler", "pos": [x, y], "size": [w, h], "flags": {},
                "order": 6, "mode": 0,
                "inputs": [{"name": "model", "type": "MODEL", "link": 2}, ...],
                "outputs": [{"name": "LATENT", "type": "LATENT", "links": [9], "slot_index": 0}],
                "properties": {"Node name for S&R": "KSampler"},
                "widgets_values": [seed, "fixed", steps, cfg, "ddim", "normal", 1.0]}, ...],
     "links": [[link id, from node, from slot, to node, to slot, "TYPE"], ...],
     "groups": [], "config": {}, "extra": {...}, "version": 0.4}

``inputs`` lists a node's link inputs in declaration order (a link's ``to slot`` indexes
this list); ``widgets_values`` holds the literal inputs in declaration order, plus the
values of the editor's own helper widgets: after an INT named ``seed``/``noise_seed`` (or
declared ``control_after_generate``) the "control after generate" choice, after an image
upload list the upload button's ``"image"``.

``ui_to_api`` handles what the kit writes and plain hand-made graphs: it drops notes and
muted nodes, and reports (rather than guesses at) editor-only nodes such as Reroute or
PrimitiveNode and bypassed nodes; for those, export with the editor's "Save (API)".
"""
from __future__ import annotations

from kolors_course.comfyui.definitions import input_specs, load_object_info, output_names, outputs

#: editor-only nodes carrying nothing ComfyUI executes
NOTE_NODES = {"Note", "MarkdownNote"}
#: editor-only nodes that rewire or feed other nodes; converting them needs the editor
EDITOR_NODES = {"Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASS = 2, 4

COLUMN_WIDTH, ROW_HEIGHT, NODE_WIDTH = 380, 40, 330


def _helper_values(spec) -> list:
    """Values the editor stores after a widget for its own helper widgets."""
    if spec.type == "INT" and (spec.name in ("seed", "noise_seed") or spec.options.get("control_after_generate")):
        return ["fixed"]           # "control after generate": fixed, so the saved seed is the one used
    if spec.type == "COMBO" and spec.options.get("image_upload"):
        return ["image"]
    return []


def _columns(api: dict) -> dict:
    """Each node's column: its longest chain of links from a node without inputs."""
    memo, busy = {}, set()

    def depth(node_id):
        if node_id in memo:
            return memo[node_id]
        if node_id in busy:            # a cycle: ComfyUI rejects it; lay it out anyway
            return 0
        busy.add(node_id)
        parents = [str(v[0]) for v in api[node_id].get("inputs", {}).values()
                   if isinstance(v, (list, tuple)) and len(v) == 2 and str(v[0]) in api]
        memo[node_id] = 1 + max(map(depth, parents)) if parents else 0
        busy.discard(node_id)
        return memo[node_id]

    return {n: depth(n) for n in api}


def api_to_ui(api: dict, object_info=None, extra: dict | None = None) -> dict:
    """The editor's format for an API-format workflow, laid out left to right by depth."""
    defs = load_object_info(object_info)
    ids = {}
    for n in api:                          # UI ids are integers; keep the API's where they are
        ids[n] = int(n) if str(n).isdigit() and int(n) not in ids.values() else None
    next_id = max([i for i in ids.values() if i is not None], default=0) + 1
    for n in api:
        if ids[n] is None:
            ids[n], next_id = next_id, next_id + 1

    columns = _columns(api)
    order = sorted(api, key=lambda n: (columns[n], ids[n]))
    col_y = {}
    links, ui_nodes, by_id = [], [], {}
    for rank, n in enumerate(order):
        node = api[n]
        d = defs[node["class_type"]]
        specs = input_specs(d, node["class_type"])
        given = node.get("inputs", {})
        widgets = [s for s in specs if s.is_widget]
        link_inputs = [s for s in specs if not s.is_widget or _linked(given.get(s.name))]
        values = []
        for s in widgets:
            v = given.get(s.name, s.options.get("default"))
            if _linked(v):                 # a widget fed by a link keeps a placeholder value
                v = s.options.get("default")
            values += [v] + _helper_values(s)
        col = columns[n]
        y = col_y.get(col, 60)
        height = 46 + 26 * (len(link_inputs) + len(widgets)) + (200 if "text" in given else 0)
        col_y[col] = y + height + ROW_HEIGHT
        ui = {"id": ids[n], "type": node["class_type"], "pos": [40 + col * COLUMN_WIDTH, y],
              "size": [NODE_WIDTH, height], "flags": {}, "order": rank, "mode": 0,
              "inputs": [{"name": s.name, "type": s.type, "link": None} | (
                  {"widget": {"name": s.name}} if s.is_widget else {}) for s in link_inputs],
              "outputs": [{"name": name, "type": t, "links": [], "slot_index": i}
                          for i, (name, t) in enumerate(zip(output_names(d), outputs(d)))],
              "properties": {"Node name for S&R": node["class_type"]},
              "widgets_values": values}
        title = (node.get("_meta") or {}).get("title")
        if title:
            ui["title"] = title
        ui_nodes.append(ui)
        by_id[n] = ui
    for n in order:
        target = by_id[n]
        for slot, inp in enumerate(target["inputs"]):
            v = api[n].get("inputs", {}).get(inp["name"])
            if not _linked(v) or str(v[0]) not in by_id:
                continue
            source = by_id[str(v[0])]
            link_id = len(links) + 1
            out = source["outputs"][v[1]]
            links.append([link_id, source["id"], v[1], target["id"], slot, out["type"]])
            inp["link"] = link_id
            out["links"].append(link_id)
    for ui in ui_nodes:
        for out in ui["outputs"]:
            out["links"] = out["links"] or None
    return {"last_node_id": max(by_id[n]["id"] for n in by_id), "last_link_id": len(links),
            "nodes": sorted(ui_nodes, key=lambda u: u["id"]), "links": links, "groups": [], "config": {},
            "extra": dict(extra or {}, ds={"scale": 1.0, "offset": [0, 0]}), "version": 0.4}


def _linked(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int) \
        and isinstance(value[0], (str, int)) and not isinstance(value[0], bool)


def ui_to_api(ui: dict, object_info=None) -> tuple[dict, list[str]]:
    """``(api_workflow, problems)``: the API format of an editor workflow; ``problems``
    names what could not be converted (the rest is converted all the same)."""
    defs = load_object_info(object_info)
    problems = []
    links = {}
    for link in ui.get("links", []) or []:
        if isinstance(link, dict):         # newer editors may write links as objects
            link = [link.get("id"), link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                    link.get("target_slot"), link.get("type")]
        if isinstance(link, (list, tuple)) and len(link) >= 5:
            links[link[0]] = link
    api = {}
    for node in ui.get("nodes", []):
        nid, cls = node.get("id"), node.get("type")
        if cls in NOTE_NODES or node.get("mode") == MODE_MUTED:
            continue
        if cls in EDITOR_NODES:
            problems.append(f"node {nid} ({cls}) exists only in the editor; save the workflow with "
                            "'Save (API)' to validate it")
            continue
        if node.get("mode") == MODE_BYPASS:
            problems.append(f"node {nid} ({cls}) is bypassed; save the workflow with 'Save (API)' to validate it")
            continue
        inputs = {}
        definition = defs.get(cls)
        if definition is not None:
            values = node.get("widgets_values", [])
            if isinstance(values, dict):
                inputs.update(values)
            else:
                values, i = list(values or []), 0
                for s in (s for s in input_specs(definition, cls) if s.is_widget):
                    if i < len(values):
                        inputs[s.name] = values[i]
                    i += 1 + len(_helper_values(s))
        for inp in node.get("inputs", []) or []:
            link = links.get(inp.get("link"))
            if inp.get("link") is None:
                continue
            if link is None:
                problems.append(f"node {nid} ({cls}) input {inp.get('name')!r} uses link {inp.get('link')}, "
                                "which the workflow does not have")
                continue
            inputs[inp["name"]] = [str(link[1]), link[2]]
        entry = {"class_type": cls, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[str(nid)] = entry
    return api, problems
