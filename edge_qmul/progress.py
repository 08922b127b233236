"""Progress bars for long work (rich), silenced with ``quiet`` or when stderr is not a terminal in CI."""

from __future__ import annotations

import os
import sys
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _RichProgress


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        show = not quiet and sys.stderr.isatty() and os.environ.get("EDGE_QMUL_QUIET") != "1"
        self._bar = (
            _RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=True,
            )
            if show
            else None
        )

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)

    def add(self, description: str, total: int) -> int:
        return int(self._bar.add_task(description, total=total)) if self._bar is not None else 0

    def advance(self, task: int, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(task, n)  # type: ignore[arg-type]
