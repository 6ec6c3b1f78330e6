"""ComfyUI entry point of the DynamiCrafter node pack.

ComfyUI loads this repository as a package named after its folder path, so everything here is
imported relatively: our ``nodes/`` package must never be imported as the top-level ``nodes``
(that name is ComfyUI's own module).  The model library ``dynamicrafter/`` is made importable
under its own top-level name (it never imports ComfyUI).
"""
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _ensure_library():
    """Import this checkout's ``dynamicrafter`` library as the top-level ``dynamicrafter``."""
    mod = sys.modules.get("dynamicrafter")
    if mod is not None:
        return mod
    pkg_dir = os.path.join(_ROOT, "dynamicrafter")
    spec = importlib.util.spec_from_file_location("dynamicrafter", os.path.join(pkg_dir, "__init__.py"),
                                                  submodule_search_locations=[pkg_dir])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dynamicrafter"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop("dynamicrafter", None)
        raise
    return mod


_ensure_library()

if "comfy" in sys.modules:   # loaded by ComfyUI (pytest also imports this file, as a package, without it)
    from .nodes import comfy_entrypoint  # noqa: E402,F401  (ComfyUI's V3 entry point)

WEB_DIRECTORY = "./web"    # web/js: the Templates browser lists our templates in order, the demo first
