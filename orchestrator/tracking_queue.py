"""Writes to a tracking server that may go away: queued in order, retried with backoff, never lost.

The sweep's driver submits operations and goes on; one background thread performs them in order.
When the server does not answer, the thread waits (0.5 s, doubling up to 30 s) and tries the same
operation again, so nothing is skipped or reordered. What is still queued when the sweep ends (and
a flush deadline passed) is saved to a folder as JSON lines plus copies of the files, and the end
of the sweep says so.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TRANSIENT_WORDS = ("connection", "max retries", "timed out", "timeout", "temporarily", "502", "503", "504",
                   "database is locked", "remote end closed", "broken pipe", "name or service not known")


def is_transient(error: BaseException) -> bool:
    """A failure that waiting can cure (the server or network is away), not a rejected request."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(error).__name__}: {error}".lower()
    return any(word in text for word in TRANSIENT_WORDS)


@dataclass
class Operation:
    describe: str  # for people: "metrics of epoch 3 of trial 00001"
    perform: Callable[[], None]
    record: dict = field(default_factory=dict)  # what it writes, as JSON, for the spill file
    files: list[Path] = field(default_factory=list)  # local files it uploads (kept until written)


class ResilientWriter:
    """Performs operations in order on a background thread, retrying transient failures."""

    def __init__(self, spill_dir: Path, first_wait: float = 0.5, longest_wait: float = 30.0) -> None:
        self.spill_dir = Path(spill_dir)
        self.first_wait, self.longest_wait = first_wait, longest_wait
        self._queue: deque[Operation] = deque()
        self._condition = threading.Condition()
        self._closing = False
        self.rejected: list[tuple[Operation, str]] = []  # refused by the server: retrying cannot help
        self.outages = 0  # times the server went away
        self.written = 0
        self._thread = threading.Thread(target=self._work, name="tracking-writer", daemon=True)
        self._thread.start()

    def submit(self, operation: Operation) -> None:
        with self._condition:
            self._queue.append(operation)
            self._condition.notify_all()

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._queue)

    def _work(self) -> None:
        wait = self.first_wait
        away = False
        while True:
            with self._condition:
                while not self._queue and not self._closing:
                    self._condition.wait()
                if not self._queue:
                    return
                operation = self._queue[0]
            try:
                operation.perform()
            except Exception as error:  # noqa: BLE001 - every failure is either retried or recorded
                if is_transient(error):
                    if not away:
                        self.outages += 1
                        log.warning("tracking server unreachable (%s); %d writes queued, retrying",
                                    str(error).splitlines()[0][:200], self.pending)
                    away = True
                    with self._condition:
                        if self._closing and self._deadline_passed():
                            return
                        self._condition.wait(wait)
                    wait = min(wait * 2, self.longest_wait)
                    continue
                self.rejected.append((operation, f"{type(error).__name__}: {error}"))
                log.warning("tracking write refused and saved: %s: %s", operation.describe, error)
            else:
                self.written += 1
                if away:
                    log.warning("tracking server back; writing the %d queued writes", self.pending)
                away, wait = False, self.first_wait
            with self._condition:
                self._queue.popleft()
                self._condition.notify_all()

    def _deadline_passed(self) -> bool:
        return time.monotonic() >= self._deadline

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued is written (True) or `timeout` seconds passed (False)."""
        end = time.monotonic() + timeout
        with self._condition:
            while self._queue and time.monotonic() < end:
                self._condition.wait(min(0.2, max(0.0, end - time.monotonic())))
            return not self._queue

    def close(self, timeout: float) -> str | None:
        """Flush for up to `timeout` s, stop, save what is left; a summary when something was not written."""
        self._deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout=5)
        with self._condition:
            left = list(self._queue)
            self._queue.clear()
        unsent = [(op, "the tracking server did not answer before the end of the sweep") for op in left]
        unsent += self.rejected
        if not unsent:
            return None
        return self._spill(unsent)

    def _spill(self, unsent: list[tuple[Operation, str]]) -> str:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for index, (operation, reason) in enumerate(unsent):
            copies = []
            for path in operation.files:
                if path.exists():
                    target = self.spill_dir / "files" / f"{index:05d}" / path.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)
                    copies.append(str(target))
            lines.append(json.dumps({"what": operation.describe, "why": reason, **operation.record, "files": copies}))
        journal = self.spill_dir / "unsent.jsonl"
        with journal.open("a") as out:
            out.write("\n".join(lines) + "\n")
        return (f"{len(unsent)} tracking writes could not be made ({unsent[0][1]}); they are saved in {journal} "
                f"(files under {self.spill_dir / 'files'}): nothing is lost")
