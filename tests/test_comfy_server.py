"""The node pack inside ComfyUI's real HTTP server (a subprocess on a loopback port):
/object_info, queued prompts, interrupt mid-sampling, errors that leave the server serving."""
from __future__ import annotations

import sys
import pytest

import comfy_runtime

sys.path.insert(0, str(comfy_runtime.REPO_ROOT / "scripts"))
from comfy_workflow import load_workflow  # noqa: E402
from run_workflow import prepare_prompt  # noqa: E402

from test_comfy_nodes import EXPECTED_NODES, H, T, W, WORKFLOWS  # noqa: E402


class _Schema:
    """Node schemas from the server's /object_info, shaped like NODE_CLASS_MAPPINGS for the converter."""

    def __init__(self, info: dict):
        self.info = info

    def get(self, name, default=None):
        if name not in self.info:
            return default
        spec = self.info[name]

        class Node:
            RETURN_TYPES = tuple(spec["output"])
            RETURN_NAMES = tuple(spec["output_name"])

            @staticmethod
            def INPUT_TYPES():
                return {k: {n: tuple(v) if isinstance(v, list) else v for n, v in spec["input"].get(k, {}).items()}
                        for k in ("required", "optional")}
        return Node


@pytest.fixture(scope="module")
def schema(comfy_server):
    return _Schema(comfy_server.object_info())


def server_prompt(schema, steps=3, **sets):
    wf = load_workflow(WORKFLOWS / "DynamiCrafter image to video.json")
    extra = [f"{k.replace('__', '.')}={v}" for k, v in sets.items()]
    return prepare_prompt(wf, schema, "dc_tiny_v.safetensors", ["single_image.png"], W, H, T, steps, extra)


def test_object_info_lists_every_node(comfy_server, comfy):
    info = comfy_server.object_info()
    assert EXPECTED_NODES <= set(info), EXPECTED_NODES - set(info)
    loader = info["DynamiCrafterLoader"]
    assert loader["output"] == ["MODEL", "CLIP", "CLIP_VISION,DYNAMICRAFTER_CLIP_VISION", "VAE"]
    # our clip_vision pairs core's type with the pack's: a link dropped on the canvas offers only the
    # nodes taking that exact pair (test_browser), while either side still connects to the other's
    from comfy_execution.validation import validate_node_input
    ours = loader["output"][2]
    takers = [n for n, d in info.items() for spec in {**d["input"].get("required", {}),
                                                      **d["input"].get("optional", {})}.values() if spec[0] == ours]
    assert {"DynamiCrafterCLIPVisionEncode", "DynamiCrafterI2V", "DynamiCrafterLongVideo"} <= set(takers), takers
    assert all(n.startswith("DynamiCrafter") for n in takers), takers
    core_input = info["CLIPVisionEncode"]["input"]["required"]["clip_vision"][0]
    assert validate_node_input(ours, core_input) and validate_node_input(info["CLIPVisionLoader"]["output"][0], ours)
    assert loader["input"]["required"]["ckpt_name"][0] == "COMBO"          # V3 combo: choices in "options"
    assert "dc_tiny_v.safetensors" in loader["input"]["required"]["ckpt_name"][1]["options"]
    assert info["DynamiCrafterDDIMSampler"]["input_order"]["required"][:4] == \
        ["model", "positive", "negative", "latent_image"]


def test_prompt_runs_over_http_and_writes_video(comfy_server, schema, comfy_base):
    pid = comfy_server.queue(server_prompt(schema, DynamiCrafterDDIMSampler__seed=3))
    entry = comfy_server.wait(pid, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = [i for o in entry["outputs"].values() for i in o.get("images", [])]
    assert files and files[0]["filename"].endswith(".mp4")
    assert (comfy_base / "output" / files[0]["subfolder"] / files[0]["filename"]).stat().st_size > 0


def test_interrupt_mid_sampling_leaves_server_serving(comfy_server, schema):
    seen = []

    def on_message(kind, data):
        if kind == "progress" and data.get("max") == 60:
            seen.append(data["value"])
            if data["value"] >= 2:
                comfy_server.interrupt()
                return True
        return False

    pid = comfy_server.queue_and_watch(server_prompt(schema, steps=60, DynamiCrafterDDIMSampler__seed=9), on_message)
    assert seen, "no sampling progress arrived over the websocket"
    entry = comfy_server.wait(pid, timeout=120)
    events = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in events, events
    assert comfy_server.alive()
    pid2 = comfy_server.queue(server_prompt(schema, steps=2, DynamiCrafterDDIMSampler__seed=10))
    assert comfy_server.wait(pid2, timeout=300)["status"]["status_str"] == "success"


def test_bad_widget_is_rejected_with_node_errors(comfy_server, schema):
    with pytest.raises(comfy_runtime.PromptFailed) as e:     # frames 0 is "the model's own": -1 is out of range
        comfy_server.queue(server_prompt(schema, DynamiCrafterImageConditioning__frames=-1))
    body = e.value.details["body"]
    assert e.value.details["status"] == 400
    text = str(body["node_errors"])
    assert "frames" in text and "smaller than min" in text
    assert comfy_server.alive()


def test_execution_error_is_reported_and_server_keeps_serving(comfy_server, schema):
    pid = comfy_server.queue(server_prompt(schema, DynamiCrafterImageConditioning__width=120))
    entry = comfy_server.wait(pid, timeout=300)
    assert entry["status"]["status_str"] == "error"
    err = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
    assert err["node_type"] == "DynamiCrafterImageConditioning"
    assert "multiple of 64" in err["exception_message"]
    assert comfy_server.alive()


def test_templates_are_listed_with_their_thumbnails(comfy_server):
    """The Templates browser's sources: /workflow_templates lists every bundled workflow under the
    pack, and /api/workflow_templates/<pack>/<name>.jpg (the frontend's thumbnail URL) serves that
    workflow's card (scripts/make_thumbnails.py: its example inputs, or docs/images/<name>.png)."""
    import io

    import numpy as np
    from PIL import Image
    from make_thumbnails import THUMB_SIZE, card
    from urllib.parse import quote
    listed = comfy_server.get_json("/workflow_templates")[comfy_runtime.PACK_NAME]
    assert sorted(listed) == sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    for name in listed:
        status, body = comfy_server._request(f"/api/workflow_templates/{comfy_runtime.PACK_NAME}/{quote(name)}.jpg")
        served = Image.open(io.BytesIO(body))
        assert status == 200 and served.format == "JPEG" and served.size == THUMB_SIZE, name
        expected = card(WORKFLOWS / f"{name}.json")
        diff = np.abs(np.asarray(served.convert("RGB"), float) - np.asarray(expected, float)).mean()
        assert diff < 2.5, f"{name}.jpg is not the card scripts/make_thumbnails.py makes (mean diff {diff:.1f})"
