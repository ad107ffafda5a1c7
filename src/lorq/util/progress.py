"""Progress reporting without printing: ``progress(stage, total)`` returns ``advance(n)``.

Library functions call the factory once per long stage, after validating their inputs (so a
failing call shows no bar), and ``advance`` with the number of steps done. The CLI renders stages
as rich progress bars; the default reports nothing.
"""

from __future__ import annotations

from collections.abc import Callable

Advance = Callable[[int], None]
Progress = Callable[[str, int], Advance]


def _ignore(steps: int) -> None:
    return None


def no_progress(stage: str, total: int) -> Advance:
    return _ignore
