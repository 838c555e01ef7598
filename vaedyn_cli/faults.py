"""Fault injection, a test facility: kill the process at a named point of training, as a power cut would.

`VAEDYN_FAULT` holds one or more `POINT:STEP` pairs separated by commas, e.g.
`VAEDYN_FAULT=checkpoint_save:4` or `VAEDYN_FAULT=step:5,writer_flush:6`. When the code reaches
`maybe_fail(POINT, STEP)` the process sends itself SIGKILL: no `finally`, no atexit, no flush, so
whatever is on disk at that instant is what a resumed run finds. The points:

- `step`: inside optimizer step STEP, after its last backward and before the optimizer update.
- `checkpoint_save`: while saving the checkpoint of step STEP, after accelerate wrote its files into
  the temporary folder and before that folder is renamed into place.
- `writer_flush`: in the trace writer thread, while committing a range of steps that includes STEP,
  after the data arrays were written and before `committed_steps` is updated.

The variable is read once, at import; without it `maybe_fail` returns at once.
"""

from __future__ import annotations

import os
import signal

ENV = "VAEDYN_FAULT"
POINTS = ("step", "checkpoint_save", "writer_flush")


def _parse(text: str) -> dict[str, frozenset[int]]:
    found: dict[str, set[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, step = item.partition(":")
        if point not in POINTS or not step.strip().lstrip("-").isdigit():
            raise ValueError(f"{ENV}: {item!r} is not POINT:STEP with POINT one of {', '.join(POINTS)}")
        found.setdefault(point, set()).add(int(step))
    return {point: frozenset(steps) for point, steps in found.items()}


_FAULTS = _parse(os.environ.get(ENV, ""))


def armed(point: str) -> frozenset[int]:
    """The steps at which `point` kills the process (empty without VAEDYN_FAULT)."""
    return _FAULTS.get(point, frozenset())


def maybe_fail(point: str, step: int) -> None:
    """SIGKILL this process when VAEDYN_FAULT names (point, step)."""
    if _FAULTS and step in _FAULTS.get(point, ()):
        os.kill(os.getpid(), signal.SIGKILL)
