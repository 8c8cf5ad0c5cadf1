"""Fault injection for the recovery tests: the process dies abruptly at a named point, as a crash would.

    LCTRAIN_FAULT=<point>:<step>[:<rank>]   points: during_save (files written, not yet renamed), after_step
    LCTRAIN_FAULT_ONCE=<path>               die only if <path> does not exist yet (it is created first), so a
                                            restarted run passes the same point
Unset (the normal case) it does nothing.
"""
from __future__ import annotations

import os
import pathlib


def maybe_fail(point: str, step: int) -> None:
    spec = os.environ.get("LCTRAIN_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != point or int(parts[1]) != step:
        return
    if len(parts) > 2 and int(parts[2]) != int(os.environ.get("RANK", "0")):
        return
    once = os.environ.get("LCTRAIN_FAULT_ONCE")
    if once:
        marker = pathlib.Path(once)
        if marker.exists():
            return
        marker.write_text(spec)
    os._exit(17)
