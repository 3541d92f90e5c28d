"""The one progress bar: a `\\r`-updated line on stderr, silent unless stderr is a terminal,
so logs and captured output stay clean."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, label: str, total: int, enabled: bool = True, stream=None, width: int = 20):
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label, self.total, self.width = label, max(total, 1), width
        self.start = self.last = time.perf_counter()
        self.shown = False

    def update(self, done: int, text: str = "") -> None:
        """Show `done` of `total` and a free `text`; redraws at most ten times a second."""
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and done < self.total):
            return
        self.last, self.shown = now, True
        filled = int(self.width * done / self.total)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{done}/{self.total} {text}")
        self.stream.flush()

    def rate(self, count: float) -> float:
        """`count` per second since the bar was created."""
        return count / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
