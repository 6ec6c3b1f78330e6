"""A real ComfyUI (0.3.75, from ``.comfyui/`` made by ``scripts/setup.sh``) for tests and scripts.

Two ways to drive it, both with this repository installed as the custom node pack
``BASE/custom_nodes/ComfyUI-DynamiCrafter`` (a symlink to the checkout):

* :class:`InProcessComfy` - ComfyUI's own executor in this Python process: the
  prompt is validated with ``execution.validate_prompt`` and run by ``execution.PromptExecutor``
  exactly as the server's worker thread would, without HTTP.  One per process (ComfyUI keeps
  global state: node mappings, cli args, folder paths).
* :class:`ComfyServer` - ``main.py`` as a subprocess on a free loopback port,
  driven over HTTP (``/system_stats``, ``/object_info``, ``/prompt``, ``/history``,
  ``/interrupt``) with bounded waits everywhere.

ComfyUI's top-level module names (``nodes``, ``utils``, ``server``, ``app``, ``execution``) shadow
same-named modules, so the ComfyUI tree goes first on ``sys.path`` and this repository's own
``nodes/`` package is only ever imported relatively, as part of the pack.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-DynamiCrafter"


def comfy_dir() -> Path:
    """The ComfyUI tree: ``$DYNAMICRAFTER_COMFYUI`` or ``<repo>/.comfyui``."""
    return Path(os.environ.get("DYNAMICRAFTER_COMFYUI", REPO_ROOT / ".comfyui")).resolve()


def comfy_missing_reason() -> str | None:
    """Why no ComfyUI can be used here, or None when it can."""
    tree = comfy_dir()
    if not (tree / "main.py").is_file() or not (tree / "execution.py").is_file():
        return f"no ComfyUI tree at {tree}: run `bash scripts/setup.sh` first"
    return None


def reference_dir() -> Path:
    """The shared reference folder: ``$DYNAMICRAFTER_REFERENCE`` or ``../shared/reference``."""
    env = os.environ.get("DYNAMICRAFTER_REFERENCE")
    if env:
        return Path(env).resolve()
    return (REPO_ROOT.parent / "shared" / "reference").resolve()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        if dst.is_symlink() and Path(os.readlink(dst)) == src:
            return
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        else:
            dst.unlink()
    os.symlink(src, dst)


def make_base_dir(base: Path, models: dict[str, dict[str, Path]] | None = None,
                  inputs: dict[str, Path] | None = None) -> Path:
    """Lay out a ComfyUI base directory.

    ``models`` maps a model folder name (``checkpoints``, ``clip``, ``vae``...) to
    ``{file name: source path}``; files are symlinked, never copied.  ``inputs`` maps input
    file names to sources (copied: ComfyUI may annotate them).  The pack is linked into
    ``custom_nodes`` and the web UI's first-run tutorial is marked done for the default user.
    """
    base = Path(base).resolve()
    for sub in ("custom_nodes", "input", "output", "temp", "models/checkpoints",
                "models/diffusion_models", "models/clip", "models/text_encoders",
                "models/clip_vision", "models/vae", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    _link(REPO_ROOT, base / "custom_nodes" / PACK_NAME)
    for folder, files in (models or {}).items():
        for name, src in files.items():
            _link(Path(src).resolve(), base / "models" / folder / name)
    for name, src in (inputs or {}).items():
        shutil.copyfile(src, base / "input" / name)
    settings = base / "user" / "default" / "comfy.settings.json"
    data = {}
    if settings.is_file():
        try:
            data = json.loads(settings.read_text())
        except ValueError:
            data = {}
    data.update({"Comfy.TutorialCompleted": True})
    settings.write_text(json.dumps(data, indent=1))
    return base


class PromptFailed(RuntimeError):
    """A prompt that did not validate or did not execute; ``details`` holds ComfyUI's answer."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


# ----------------------------------------------------------------------------- in process
class InProcessComfy:
    """ComfyUI's executor in this process (create at most one per process)."""

    _instance: "InProcessComfy | None" = None

    def __init__(self, base_dir: Path, extra_args: dict | None = None):
        if InProcessComfy._instance is not None:
            raise RuntimeError("ComfyUI can be booted only once per process; reuse InProcessComfy.get()")
        reason = comfy_missing_reason()
        if reason:
            raise RuntimeError(reason)
        self.base_dir = Path(base_dir).resolve()
        tree = str(comfy_dir())
        # ComfyUI's modules must win over anything else on the path (our own nodes/ above all).
        if tree in sys.path:
            sys.path.remove(tree)
        sys.path.insert(0, tree)
        stale = sys.modules.get("nodes")
        if stale is not None and not str(getattr(stale, "__file__", "")).startswith(tree):
            raise RuntimeError(f"a foreign 'nodes' module was imported before ComfyUI: {stale!r}")

        import comfy.options  # noqa: F401  (argument parsing stays off: defaults, then ours)
        from comfy.cli_args import args
        args.cpu = True
        args.base_directory = str(self.base_dir)
        args.disable_api_nodes = True
        args.disable_auto_launch = True
        for k, v in (extra_args or {}).items():
            setattr(args, k, v)

        held = _HeldBootLogs()
        logging.getLogger().addFilter(held)
        try:
            self._boot(args)
        finally:
            logging.getLogger().removeFilter(held)
            held.release()
        InProcessComfy._instance = self

    def _boot(self, args) -> None:
        import folder_paths
        import utils.extra_config  # noqa: F401  (must precede `nodes`, as in main.py)
        import comfy.model_management
        import comfy.utils
        import execution
        import server
        import nodes

        self.folder_paths = folder_paths
        self.execution = execution
        self.nodes = nodes
        self.mm = comfy.model_management
        self.loop = asyncio.new_event_loop()
        self.server = server.PromptServer(self.loop)
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.progress: list[tuple[int, int, bool]] = []
        self.on_progress = None  # optional callable(value, total) run inside the progress hook

        def hook(value, total, preview_image, prompt_id=None, node_id=None):
            self.progress.append((int(value), int(total), preview_image is not None))
            if self.on_progress is not None:
                self.on_progress(value, total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        comfy.utils.set_progress_bar_global_hook(hook)
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

    @classmethod
    def get(cls) -> "InProcessComfy | None":
        return cls._instance

    @property
    def node_classes(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    @property
    def output_dir(self) -> Path:
        return Path(self.folder_paths.get_output_directory())

    @property
    def input_dir(self) -> Path:
        return Path(self.folder_paths.get_input_directory())

    def validate(self, prompt: dict) -> tuple[bool, dict, list, dict]:
        pid = str(uuid.uuid4())
        return asyncio.run(self.execution.validate_prompt(pid, prompt, None))

    def run(self, prompt: dict, check: bool = True) -> dict:
        """Validate then execute an API-format prompt; returns
        ``{"success", "outputs", "messages", "prompt_id"}``.  With ``check`` a failure raises
        :class:`PromptFailed` carrying ComfyUI's error (validation or execution)."""
        pid = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(self.execution.validate_prompt(pid, prompt, None))
        if not valid:
            details = {"error": error, "node_errors": node_errors}
            if check:
                raise PromptFailed(_format_validation(error, node_errors), details)
            return {"success": False, "validation": details, "outputs": {}, "messages": [], "prompt_id": pid}
        self.progress.clear()
        self.executor.execute(prompt, pid, {}, outputs)
        result = {
            "success": self.executor.success,
            "outputs": self.executor.history_result.get("outputs", {}),
            "messages": list(self.executor.status_messages),
            "prompt_id": pid,
        }
        if check and not result["success"]:
            raise PromptFailed(_format_messages(result["messages"]), result)
        return result

    def interrupt(self) -> None:
        self.nodes.interrupt_processing(True)


class _HeldBootLogs(logging.Filter):
    """Holds ComfyUI's boot-time log records, then passes them on except the noise about its own
    audio nodes when torchaudio (which nothing of ours needs) is not installed: each such import
    failure prints a traceback and generic "pip install -r requirements.txt" advice.  Any other
    record - our pack failing to import above all - is passed on unchanged, in order."""

    OPTIONAL = "torchaudio"

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False

    def release(self) -> None:
        texts = [r.getMessage() for r in self.records]
        failed, optional = set(), set()
        for text in texts:
            if text.startswith("Cannot import ") and " module for custom nodes: " in text:
                module = Path(text[len("Cannot import "):].split(" module for custom nodes: ")[0]).name
                failed.add(module)
                if f"No module named '{self.OPTIONAL}'" in text:
                    optional.add(module)
        only_optional = failed == optional
        dropped = False
        for record, text in zip(self.records, texts):
            noise = (f"{self.OPTIONAL} missing" in text
                     or (text.startswith("Traceback") and f"No module named '{self.OPTIONAL}'" in text)
                     or (text.startswith("Cannot import ") and any(m in text for m in optional))
                     or (text.startswith("IMPORT FAILED: ") and text[len("IMPORT FAILED: "):].strip() in optional)
                     or (only_optional and _is_generic_import_advice(text)))
            if noise:
                dropped = True
                continue
            logging.getLogger(record.name).handle(record)
        if dropped:
            logging.getLogger(__name__).info("ComfyUI's audio nodes are off (%s is not installed); "
                                             "nothing here needs them", self.OPTIONAL)


def _is_generic_import_advice(text: str) -> bool:
    t = text.strip()
    return (not t or "some comfy_extras/ nodes did not import" in t or "might be caused by new missing" in t
            or t.startswith("Please do a: pip install"))


def _format_validation(error: dict, node_errors: dict) -> str:
    parts = [f"{error.get('message', '')}: {error.get('details', '')}".strip(": ")]
    for nid, ne in (node_errors or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(parts)


def _format_messages(messages: list) -> str:
    for event, data in messages:
        if event == "execution_error":
            return f"{data.get('node_type')} (node {data.get('node_id')}): " \
                   f"{data.get('exception_type')}: {data.get('exception_message')}"
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return "prompt failed without an error message"


def execution_error(result: dict) -> dict | None:
    """The ``execution_error`` message of a run result, if any."""
    for event, data in result.get("messages", []):
        if event == "execution_error":
            return data
    return None


# ----------------------------------------------------------------------------- HTTP server
class ComfyServer:
    """``main.py`` in a subprocess on a free loopback port; use as a context manager."""

    def __init__(self, base_dir: Path, port: int | None = None, log_path: Path | None = None,
                 python: str | None = None, extra_args: list[str] | None = None):
        reason = comfy_missing_reason()
        if reason:
            raise RuntimeError(reason)
        self.base_dir = Path(base_dir).resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path or self.base_dir / "server.log")
        self.python = python or sys.executable
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self._log = None

    # -- lifecycle
    def start(self, timeout: float = 120.0) -> "ComfyServer":
        cmd = [self.python, str(comfy_dir() / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch",
               "--base-directory", str(self.base_dir), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", *self.extra_args]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "2")
        env["PYTHONUNBUFFERED"] = "1"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(comfy_dir()), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI not ready on {self.url} after {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        try:
            self.get_json("/system_stats", timeout=5)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"

    # -- HTTP
    def _request(self, path: str, data: bytes | None = None, timeout: float = 30.0):
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()

    def get_json(self, path: str, timeout: float = 30.0):
        _, body = self._request(path, timeout=timeout)
        return json.loads(body)

    def post_json(self, path: str, payload: dict, timeout: float = 30.0):
        """POST JSON; returns (status, parsed body) also for 4xx answers (ComfyUI's errors)."""
        try:
            status, body = self._request(path, json.dumps(payload).encode(), timeout=timeout)
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body.decode(errors="replace")

    def object_info(self) -> dict:
        return self.get_json("/object_info", timeout=60)

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})
        if status != 200:
            raise PromptFailed(f"/prompt answered {status}: {json.dumps(body)[:2000]}",
                               {"status": status, "body": body})
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Wait for a queued prompt to finish (success, error or interrupt); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died (exit {self.proc.returncode}):\n{self.log_tail()}")
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s:\n{self.log_tail()}")

    def running(self) -> bool:
        q = self.get_json("/queue")
        return bool(q.get("queue_running"))

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def queue_and_watch(self, prompt: dict, on_message, timeout: float = 300.0) -> str:
        """Queue ``prompt`` with a websocket open and call ``on_message(type, data)`` for every JSON
        event of this client until it returns True, the prompt finishes, or ``timeout``."""
        import aiohttp

        client_id = uuid.uuid4().hex

        async def go():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={client_id}", heartbeat=20) as ws:
                    pid = await asyncio.to_thread(self.queue, prompt, client_id)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        try:
                            msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
                        except asyncio.TimeoutError:
                            break
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                                break
                            continue
                        event = json.loads(msg.data)
                        kind, data = event.get("type"), event.get("data", {})
                        if on_message(kind, data):
                            break
                        if kind in ("execution_success", "execution_error", "execution_interrupted") and \
                                data.get("prompt_id") == pid:
                            break
                    return pid

        return asyncio.run(go())


def history_messages(entry: dict) -> list:
    return entry.get("status", {}).get("messages", [])
