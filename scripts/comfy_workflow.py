"""ComfyUI workflow files: build UI-format graphs and convert them to API-format prompts.

Both directions read the node definitions (``INPUT_TYPES`` / ``RETURN_TYPES``) of a running
ComfyUI's ``NODE_CLASS_MAPPINGS``, so widget order always follows the real node schema.

UI format (what the web UI saves/loads): ``nodes`` (id, type, pos, size, inputs with ``link``,
outputs with ``links``, ``widgets_values``), ``links`` (``[id, from_node, from_slot, to_node,
to_slot, type]``).  API format (what ``POST /prompt`` takes): ``{id: {class_type, inputs}}`` with
links written as ``[from_node_id, from_slot]``.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
TITLE_HEIGHT = 30        # LiteGraph's node title bar, above a node's pos
TITLE_CHAR_WIDTH = 7.8   # title text width per character in the web UI (measured, with margin)
GAP = 20                 # between nodes, and between a node and the one below it

# Nodes 2.0 (frontend 1.32.9's Vue nodes, setting Comfy.VueNodes.Enabled) opens a classic layout 1.2 times
# larger about its top-left corner (its SCALE_FACTOR) and grows a node to fit its rows: the height a node
# takes there, in layout units (its pixels / 1.2 / canvas scale; measured on every template's nodes):
VUE_SCALE = 1.2
VUE_HEADER = 45          # title bar and padding
VUE_SLOT = 20            # a row of input / output sockets
VUE_WIDGET = 28.4        # a widget row
VUE_MULTILINE = 19       # a multiline text box's extra height
VUE_PREVIEW = 168        # an upload widget's preview before its file is there
VUE_PICTURE_MARGIN = 14  # a loaded picture / video fills the node's width less this, at its aspect ratio
# The least scale a template opens at: below 8 px / 14 px = 0.571 at devicePixelRatio 1 (the settings
# LiteGraph.Canvas.MinFontSizeForLOD over LiteGraph.NODE_TEXT_SIZE) the classic canvas draws no text,
# the Notes' included (tests/test_browser.py reads the threshold from the frontend).
MIN_SCALE = 0.575


def _spec_items(node_cls) -> list[tuple[str, tuple]]:
    types = node_cls.INPUT_TYPES()
    items = []
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            items.append((name, spec if isinstance(spec, tuple) else (spec,)))
    return items


def _is_widget(spec: tuple) -> bool:
    t = spec[0]
    return isinstance(t, list) or t in WIDGET_TYPES


def widget_layout(node_cls) -> list[tuple[str, int]]:
    """[(input name, number of widgets_values it takes)] in the web UI's widget order: a seed with
    ``control_after_generate`` carries a second value, an ``image_upload`` combo an upload widget."""
    out = []
    for name, spec in _spec_items(node_cls):
        if not _is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        extra = 1 if opts.get("control_after_generate") or opts.get("image_upload") or \
            opts.get("video_upload") or opts.get("audio_upload") else 0
        out.append((name, 1 + extra))
    return out


def vue_height(node_cls, width: float = 320, aspect: float = 1.0) -> float:
    """The height (title included, layout units) Nodes 2.0 gives a node of this class at least: its
    socket rows beside each other, then a row per widget, text boxes and upload previews taller (a
    preview shows its picture or video, `aspect` = height / width, across the node's `width`)."""
    sockets, outputs = socket_inputs(node_cls), output_types(node_cls)
    h = VUE_HEADER + VUE_SLOT * max(len(sockets), len(outputs))
    for _, spec in _spec_items(node_cls):
        if not _is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        h += VUE_WIDGET + (VUE_MULTILINE if opts.get("multiline") else 0)
        if opts.get("image_upload") or opts.get("video_upload"):
            preview = max(VUE_PREVIEW, (width - VUE_PICTURE_MARGIN) * aspect)
            h += VUE_WIDGET + preview          # its upload button, then the preview
    return h


def _display_name(node_cls, ntype: str) -> str:
    schema = getattr(node_cls, "GET_SCHEMA", None)     # V3 nodes carry it in their schema
    return (schema().display_name if schema else None) or ntype


def socket_inputs(node_cls) -> list[tuple[str, str]]:
    return [(name, spec[0]) for name, spec in _spec_items(node_cls) if not _is_widget(spec)]


def output_types(node_cls) -> list[tuple[str, str]]:
    types = list(getattr(node_cls, "RETURN_TYPES", ()) or ())
    names = list(getattr(node_cls, "RETURN_NAMES", ()) or types)
    return list(zip(names, types))


# ----------------------------------------------------------------------------------------- UI -> API
def ui_to_api(workflow: dict, node_classes: dict) -> dict:
    """Convert a UI-format workflow to an API-format prompt (notes and muted/bypassed nodes dropped)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    by_id = {n["id"]: n for n in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        cls = node_classes.get(ntype)
        if cls is None:
            raise ValueError(f"workflow node {node['id']} has unknown type {ntype!r} (is its node pack installed?)")
        inputs = {}
        values = list(node.get("widgets_values") or [])
        pos = 0
        for name, count in widget_layout(cls):
            if pos < len(values):
                inputs[name] = values[pos]
            pos += count
        for inp in node.get("inputs", []) or []:
            link_id = inp.get("link")
            if link_id is None:
                continue
            link = links[link_id]
            src = by_id[link[1]]
            if src["type"] in FRONTEND_ONLY or src.get("mode", 0) in (2, 4):
                raise ValueError(f"node {node['id']} input {inp['name']!r} comes from a {src['type']} node, "
                                 f"which this converter does not resolve")
            inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs,
                                   "_meta": {"title": node.get("title", ntype)}}
    return prompt


def set_ui_widget(workflow: dict, node_type: str, name: str, value, node_classes: dict) -> int:
    """Set widget ``name`` of every ``node_type`` node in a UI-format workflow; returns how many."""
    cls = node_classes.get(node_type)
    if cls is None:
        raise ValueError(f"unknown node type {node_type!r}")
    pos = 0
    for widget, count in widget_layout(cls):
        if widget == name:
            break
        pos += count
    else:
        raise ValueError(f"{node_type} has no widget {name!r}")
    n = 0
    for node in workflow["nodes"]:
        if node["type"] == node_type:
            node["widgets_values"][pos] = value
            n += 1
    return n


def load_workflow(path) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------------------- builder
class UIGraph:
    """Builds a UI-format workflow from node definitions (ids, links, slots, positions)."""

    def __init__(self, node_classes: dict, pictures: dict | None = None):
        """pictures: input file name -> its height / width, for the room its upload preview takes
        (a file not listed is taken as square)."""
        self.classes = node_classes
        self.pictures = pictures or {}
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self._vue_h: dict[int, float] = {}     # node id -> its height in Nodes 2.0 (vue_height)

    def add(self, ntype: str, pos, widgets: dict | None = None, title: str | None = None, size=None) -> dict:
        cls = self.classes[ntype]
        widgets = dict(widgets or {})
        values = []
        for name, count in widget_layout(cls):
            if name not in widgets:
                spec = dict(_spec_items(cls))[name]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if "default" in opts:
                    widgets[name] = opts["default"]
                elif isinstance(spec[0], list) and spec[0]:
                    widgets[name] = spec[0][0]
                else:
                    raise ValueError(f"{ntype}: no value for widget {name!r}")
            values.append(widgets.pop(name))
            if count == 2:
                values.append("fixed" if name in ("seed", "noise_seed") else "image")
        if widgets:
            raise ValueError(f"{ntype}: unknown widgets {sorted(widgets)}")
        sockets, outputs = socket_inputs(cls), output_types(cls)
        shown_title = title or _display_name(cls, ntype)
        # at least what the web UI's LiteGraph lays out (measured): slot rows, widget rows, title text
        need = [TITLE_CHAR_WIDTH * len(shown_title) + 40, 14 + 20 * max(len(sockets), len(outputs)) + 24 * len(values)]
        size = size or [320, need[1]]
        node = {
            "id": len(self.nodes) + 1, "type": ntype, "pos": [float(pos[0]), float(pos[1])],
            "size": [max(size[0], need[0]), max(size[1], need[1])],
            "flags": {}, "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": ntype},
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        shown = [v for v in values if isinstance(v, str) and v in self.pictures]
        self._vue_h[node["id"]] = vue_height(cls, node["size"][0], self.pictures[shown[0]] if shown else 1.0)
        return node

    def note(self, text: str, pos, size=(420, 200), title: str = "Note") -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": [float(pos[0]), float(pos[1])],
                "size": list(size), "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [],
                "outputs": [], "properties": {"text": ""}, "widgets_values": [text], "title": title,
                "color": "#432", "bgcolor": "#653"}
        self.nodes.append(node)
        self._vue_h[node["id"]] = VUE_HEADER + VUE_WIDGET + VUE_MULTILINE
        return node

    def connect(self, src: dict, out_slot, dst: dict, input_name: str) -> None:
        if isinstance(out_slot, str):
            out_slot = [o["name"] for o in src["outputs"]].index(out_slot)
        target = next((i for i in dst["inputs"] if i["name"] == input_name), None)
        if target is None and input_name in dict(widget_layout(self.classes[dst["type"]])):
            # a widget fed by a link (the web UI's widget socket); its widgets_values entry stays
            kind = dict(_spec_items(self.classes[dst["type"]]))[input_name][0]
            target = {"name": input_name, "type": "COMBO" if isinstance(kind, list) else kind,
                      "widget": {"name": input_name}, "link": None}
            dst["inputs"].append(target)
        if target is None:
            raise ValueError(f"{dst['type']} has no input {input_name!r}")
        out = src["outputs"][out_slot]
        if target["type"] != out["type"] and "*" not in (target["type"], out["type"]):
            raise ValueError(f"type mismatch: {src['type']}.{out['name']} ({out['type']}) -> "
                             f"{dst['type']}.{input_name} ({target['type']})")
        link_id = len(self.links) + 1
        slot = dst["inputs"].index(target)
        self.links.append([link_id, src["id"], out_slot, dst["id"], slot, out["type"]])
        target["link"] = link_id
        out["links"].append(link_id)

    def group(self, title: str, members: list, color="#3f789e") -> None:
        """A titled frame around the given nodes (its bounds are taken once the layout is settled)."""
        self.groups.append({"title": title, "members": [n["id"] for n in members], "color": color, "font_size": 24})

    def _box(self, n: dict) -> tuple:
        """The room a node takes in both canvases: its title bar and body, as tall as Nodes 2.0 makes it."""
        return (n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["size"][0],
                max(n["size"][1] + TITLE_HEIGHT, self._vue_h[n["id"]]))

    def _settle(self, gap: float = GAP) -> None:
        """Stack the nodes: each keeps its x and, in the order of their pos y (then x), rises to `gap` below
        the nodes placed before it that share some of its width (gap included), or to the top. A pos y only
        orders nodes, so a column packs tight whatever heights its nodes take in either canvas."""
        placed = []
        for n in sorted(self.nodes, key=lambda n: (n["pos"][1], n["pos"][0])):
            x, _, w, _ = self._box(n)
            above = [oy + oh + gap for ox, oy, ow, oh in map(self._box, placed)
                     if x < ox + ow + gap and ox < x + w + gap]
            n["pos"][1] = max(above, default=-TITLE_HEIGHT) + TITLE_HEIGHT
            placed.append(n)

    def _group_bounds(self, group: dict, pad: float = 20.0) -> list:
        boxes = [self._box(n) for n in self.nodes if n["id"] in group["members"]]
        x0, y0 = min(b[0] for b in boxes) - pad, min(b[1] for b in boxes) - pad - 40   # room for its title
        x1, y1 = max(b[0] + b[2] for b in boxes) + pad, max(b[1] + b[3] for b in boxes) + pad
        return [x0, y0, x1 - x0, y1 - y0]

    def to_json(self) -> dict:
        self._settle()
        groups = [{"title": g["title"], "bounding": self._group_bounds(g), "color": g["color"],
                   "font_size": g["font_size"]} for g in self.groups]
        nodes = copy.deepcopy(self.nodes)
        for n in nodes:
            for o in n["outputs"]:
                if not o["links"]:
                    o["links"] = None
        return {"last_node_id": len(nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": copy.deepcopy(self.links), "groups": groups, "config": {},
                "extra": {"ds": self._fit_view(groups)}, "version": 0.4}

    def _fit_view(self, groups: list, left=70, top=105, right=1430, bottom=890) -> dict:
        """Canvas scale/offset that opens the whole graph inside a 1440x900 laptop window, right of ComfyUI's
        side bar and below its top bar, in both canvases: Nodes 2.0 draws it VUE_SCALE times larger from its
        top-left corner (tests/test_browser.py opens every template both ways). A graph too large to open at
        MIN_SCALE is refused: lay it out more compactly."""
        boxes = [self._box(n) for n in self.nodes] + [tuple(g["bounding"]) for g in groups]
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        w, h = max(b[0] + b[2] for b in boxes) - x0, max(b[1] + b[3] for b in boxes) - y0
        scale = math.floor(1000 * min(1.0, (right - left) / (VUE_SCALE * w), (bottom - top) / (VUE_SCALE * h))) / 1000
        if scale < MIN_SCALE:
            raise ValueError(f"the graph ({w:.0f} x {h:.0f}) opens at scale {scale} in a 1440x900 window, below "
                             f"{MIN_SCALE} where the classic canvas stops drawing text: lay it out more compactly")
        return {"scale": scale, "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}
