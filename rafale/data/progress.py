"""One console line that a long build rewrites as it goes: documents and tokens done, the rate, the time left.

Only on a terminal (a log file or a test's captured stderr stays quiet), and only once a build has run for a few
seconds, so that short builds print nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

# A build shorter than this prints no progress; after it, the line is rewritten at most once per interval.
QUIET_SECONDS = 3.0
INTERVAL_SECONDS = 0.5


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class BuildProgress:
    """Counts the documents and tokens of one split as they are done, and shows them on one updating line."""

    def __init__(self, what: str, total_documents: int, stream: TextIO | None = None):
        self.what = what
        self.total_documents = total_documents
        self.stream = stream or sys.stderr
        self.documents = self.tokens = 0
        self.started = self.shown = time.monotonic()
        self.visible = False

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.tokens / elapsed
        left = elapsed * (self.total_documents - self.documents) / max(self.documents, 1)
        return (f"rafale: {self.what}: {self.documents:,} of {self.total_documents:,} documents, "
                f"{self.tokens:,} tokens, {rate / 1e6:.2f}M tokens/s, {_duration(left)} left")

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.monotonic()
        if now - self.started < QUIET_SECONDS or now - self.shown < INTERVAL_SECONDS or not self.stream.isatty():
            return
        self.shown, self.visible = now, True
        # \r and clearing to the end of the line: the same line, however much shorter than the last one.
        self.stream.write(f"\r{self.line(now)}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Ends the line with the final counts, where one was shown."""
        if self.visible:
            self.stream.write(f"\r{self.line(time.monotonic())}\x1b[K\n")
            self.stream.flush()
