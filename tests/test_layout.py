"""The repository's shape: the library's sub-packages import each other without cycles, never import
ComfyUI, and the README's layout section names every module (issue #26)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dynamicrafter", "training")


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the library and the trainer."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports when it is imported (top-level statements only: imports inside
    functions run later and cannot close a cycle at import time)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = subs or [base]       # `from pkg import mod` needs mod (pkg is its parent: already loading)
        else:
            continue
        for t in targets:
            while t and t not in known:        # `import a.b.c` also imports a and a.b
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_no_import_cycles():
    mods = modules()
    graph = {name: module_level_imports(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_library_never_imports_comfyui():
    for name, path in modules().items():
        if not name.startswith("dynamicrafter"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("comfy", "comfy_api", "nodes") for n in names), (name, names)


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    listed = set(re.findall(r"`([\w/]+\.py)`", section))
    missing = [str(p.relative_to(ROOT)) for name, p in modules().items()
               if name.startswith("dynamicrafter") and p.name not in ("__main__.py", "__init__.py")
               and str(p.relative_to(ROOT)) not in listed]
    assert not missing, f"README 'Layout' does not list: {missing}"


# ----------------------------------------------------------------------------- few parameters (issue #26)
MAX_PARAMETERS = 10
SIGNATURE_DIRS = ("dynamicrafter", "nodes", "training", "scripts", "benchmarks")
NODE_SCHEMA_METHODS = ("execute", "define_schema")     # V3 nodes: their parameters are the node's widgets


def counted_parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    """Named parameters (positional and keyword-only), without self/cls; *args/**kwargs (the deprecated
    loose keywords) do not count."""
    args = fn.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    if in_class and names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names)


def long_signatures(path: Path) -> list[str]:
    """'path:line name (n)' for each public function or method of `path` over MAX_PARAMETERS (a class's
    __init__ is its public signature)."""
    found = []

    def visit(body, owner):
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, node)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                public = not node.name.startswith("_") or node.name == "__init__"
                if owner is not None and node.name in NODE_SCHEMA_METHODS:
                    public = False
                n = counted_parameters(node, owner is not None)
                if public and n > MAX_PARAMETERS:
                    name = f"{owner.name}.{node.name}" if owner is not None else node.name
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name} ({n})")

    visit(ast.parse(path.read_text()).body, None)
    return found


def test_no_public_function_takes_more_than_ten_parameters():
    """Settings travel as values (dynamicrafter.settings, nodes.inputs), not as a dozen loose arguments."""
    found = [hit for d in SIGNATURE_DIRS for path in sorted((ROOT / d).rglob("*.py")) for hit in long_signatures(path)]
    assert not found, "public functions with more than 10 parameters:\n" + "\n".join(found)
