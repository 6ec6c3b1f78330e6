"""Registry readiness: pyproject.toml read by the Comfy Registry's own tool, comfy-cli
(`comfy node validate`, the check `comfy node publish` runs first, and its parser), installed by
scripts/setup.sh into .cache/comfy-cli (its dependencies stay out of the plugin's venv)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY_CLI_VENV = Path(os.environ.get("DC_COMFY_CLI_VENV", ROOT / ".cache" / "comfy-cli"))

PARSE = """
import json, sys
from comfy_cli.registry.config_parser import extract_node_configuration, normalize_project_name
c = extract_node_configuration(sys.argv[1])
p, t = c.project, c.tool_comfy
print(json.dumps(dict(name=p.name, normalized=normalize_project_name(p.name), version=p.version,
                      license=p.license.text, repository=p.urls.repository, dependencies=p.dependencies,
                      os=p.supported_os, accelerators=p.supported_accelerators,
                      comfyui=p.supported_comfyui_version, publisher=t.publisher_id, display_name=t.display_name)))
"""


@pytest.fixture(scope="module")
def comfy_cli():
    python, comfy = COMFY_CLI_VENV / "bin" / "python", COMFY_CLI_VENV / "bin" / "comfy"
    if not (python.is_file() and comfy.is_file()):
        pytest.skip(f"comfy-cli (the registry's tool) is not installed at {COMFY_CLI_VENV}: "
                    f"`bash scripts/setup.sh` installs it there")
    return python, comfy


def _run(cmd, cwd, home):
    env = dict(os.environ, HOME=str(home), DO_NOT_TRACK="1")   # its config file lands in the tmp home
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_comfy_node_validate_passes_without_warnings(comfy_cli, tmp_path):
    _, comfy = comfy_cli
    r = _run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], ROOT, tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "All validation checks passed" in out, out
    assert "Warning" not in out and "Error" not in out, out


def test_registry_reads_every_field_we_declare(comfy_cli, tmp_path):
    """What the registry would publish: the fields comfy-cli drops with a warning (bad classifier,
    bad version range) come back empty, so each is checked present."""
    import tomllib
    python, _ = comfy_cli
    r = _run([python, "-c", PARSE, ROOT / "pyproject.toml"], tmp_path, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = json.loads(r.stdout.strip().splitlines()[-1])
    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["name"] == cfg["normalized"] == ours["project"]["name"]     # a valid registry id as written
    assert cfg["version"] == ours["project"]["version"]
    assert cfg["dependencies"] == ours["project"]["dependencies"]
    assert cfg["os"] == ["OS Independent"] and cfg["accelerators"] == ["GPU :: NVIDIA CUDA"]
    assert cfg["comfyui"] == ours["tool"]["comfy"]["requires-comfyui"] != ""
    assert cfg["license"] and cfg["repository"].startswith("https://github.com/")
    assert cfg["publisher"] and cfg["display_name"]


def test_validate_rejects_a_pyproject_without_version(comfy_cli, tmp_path):
    """The check can fail: the same file without its version is refused."""
    _, comfy = comfy_cli
    work = tmp_path / "pack"
    work.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    (work / "pyproject.toml").write_text(text.replace('version = "0.1.0"\n', ""))
    shutil.copy(ROOT / "README.md", work / "README.md")
    r = _run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], work, tmp_path)
    assert r.returncode != 0 and "version is empty" in r.stdout + r.stderr, r.stdout + r.stderr
