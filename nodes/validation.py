"""Queue-time checks (V3 ``validate_inputs``): what would fail at run time is refused when the
prompt is queued, in a message that names the node as the user sees it; and errors raised while
a node runs name it the same way (``name_run_errors``).

ComfyUI skips its own min/max/list checks for an input a node's ``validate_inputs`` takes, so
these redo them for the inputs they take.  A linked input arrives as None: it is checked at run
time by the library's contract."""
from __future__ import annotations

import functools

from dynamicrafter.contract import STEPS
from dynamicrafter.sampling.schedule import ddim_timesteps

from .inputs import SPACINGS


def steps_problem(node: str, steps, spacing) -> str | None:
    """Why `steps` cannot be sampled with `spacing` ('auto' is checked as uniform_trailing, the
    spacing of every v-prediction model, i.e. all but the 256 one), or None."""
    if steps is None or spacing is None:
        return None
    if not isinstance(steps, int) or isinstance(steps, bool):
        return f"{node}: steps must be a whole number, got {steps!r}"
    if not STEPS[0] <= steps <= STEPS[1]:
        limit = f"smaller than min of {STEPS[0]}" if steps < STEPS[0] else f"bigger than max of {STEPS[1]}"
        return f"{node}: steps: Value {steps} {limit}"
    if spacing not in SPACINGS:
        return f"{node}: spacing: Value not in list: {spacing!r} not in {SPACINGS}"
    try:
        ddim_timesteps(steps, "uniform_trailing" if spacing == "auto" else spacing)
    except ValueError as e:
        auto = " (spacing 'auto' is uniform_trailing for every v-prediction model)" if spacing == "auto" else ""
        return f"{node}: {e}{auto}"
    return None


def validate_steps(node_cls, steps, spacing):
    """A node's ``validate_inputs`` for the sampler_inputs group: True or the reason, under its display name."""
    return steps_problem(display_name(node_cls), steps, spacing) or True


def display_name(node_cls) -> str:
    """The node's name as the user sees it (its title in the graph and the node search)."""
    return node_cls.define_schema().display_name


def name_run_errors(node_cls):
    """`node_cls` with its ``execute`` naming the node by its display name in front of a bad-input
    error (ValueError) raised while it runs: ComfyUI reports a run-time failure under the class id
    (``node_type``), the user knows the node by its title. Other exceptions (interrupts, out of
    memory) pass unchanged for ComfyUI to handle."""
    execute = node_cls.execute.__func__
    if getattr(execute, "names_run_errors", False):
        return node_cls

    @functools.wraps(execute)
    def named(cls, *args, **kwargs):
        try:
            return execute(cls, *args, **kwargs)
        except ValueError as e:
            name = display_name(cls)
            if not str(e).startswith(name):
                e.args = (f"{name}: {e}",)
            raise

    named.names_run_errors = True
    node_cls.execute = classmethod(named)
    return node_cls
