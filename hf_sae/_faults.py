"""Fault injection for tests: stop the process at a named program point.

``HF_SAE_FAULT="POINT:N"`` makes the N-th arrival at ``fault_point("POINT")`` kill the process with
SIGKILL (``POINT:N:exit`` exits with status 99 instead). Several faults are separated by commas. With
the variable unset, :func:`fault_point` is a dictionary lookup.

Points in the code: ``train.step`` (after each optimizer step, N = step), ``checkpoint.state_saved``
(inside a checkpoint write, after the weights and optimizer are written), ``checkpoint.sealed`` (the
checkpoint complete under its temporary name), ``publish.between_renames`` (an older copy moved aside,
the new one not yet in place), ``export.written`` (an SAE folder written, not yet moved in place),
``export.between_renames`` (the
previous export moved aside, the new one not yet in place), ``cache.shard_recorded`` (an activation
cache's N-th shard written and recorded in progress.json).
"""

from __future__ import annotations

import os
import signal

_ENV = "HF_SAE_FAULT"
_plan: dict | None = None
_hits: dict[str, int] = {}


def _parse() -> dict:
    plan = {}
    for item in filter(None, (s.strip() for s in os.environ.get(_ENV, "").split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit() or (len(parts) == 3 and parts[2] not in ("kill", "exit")):
            raise ValueError(f"{_ENV}={os.environ[_ENV]!r}: each fault is POINT:N or POINT:N:kill|exit")
        plan[parts[0]] = (int(parts[1]), parts[2] if len(parts) == 3 else "kill")
    return plan


def fault_point(name: str) -> None:
    """Kill (or exit) here if ``HF_SAE_FAULT`` asks for the current arrival at ``name``."""
    global _plan
    if _plan is None:
        _plan = _parse()
    if not _plan or name not in _plan:
        return
    _hits[name] = _hits.get(name, 0) + 1
    n, how = _plan[name]
    if _hits[name] == n:
        if how == "exit":
            os._exit(99)
        os.kill(os.getpid(), signal.SIGKILL)
