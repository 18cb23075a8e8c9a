"""A progress bar for long work on a terminal (export, verify); silent when not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class ProgressBar:
    def __init__(self, stream: TextIO = sys.stderr, every: float = 0.1) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.every = every
        self._last = 0.0
        self._drawn = False

    def update(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.every and (done < total or not total):
            return
        self._last = now
        if not total:  # a count with no known end
            self.stream.write(f"\r{label} {done}")
            self.stream.flush()
            self._drawn = True
            return
        share = done / total
        filled = int(WIDTH * share)
        bar = "#" * filled + "-" * (WIDTH - filled)
        self.stream.write(f"\r{label} [{bar}] {share:4.0%} {done}/{total}")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
