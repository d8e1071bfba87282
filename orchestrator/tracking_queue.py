"""Writes to a tracking server that may go away: ordered per run, retried with backoff, bounded, never lost.

The sweep's driver submits operations and goes on; a few background threads perform them.

Order. Every operation has a `key` (its run: "trial 00042", "sweep"). Operations of one key are
performed one at a time, in the order they were submitted; operations of different keys run in
parallel on `threads` threads (a tracking server answers requests of several runs at once, and
each request waits mostly on the server, so one thread per run in flight multiplies the rate). A
`barrier` operation (the start and the end of the sweep) waits for everything submitted before it,
and everything submitted after it waits for it: the trials' runs need the parent run's id.
Consecutive queued operations of one key that share a `combine` function (the metrics of several
epochs) are performed as one (one request instead of several) when the queue is behind.

Outages. When the server does not answer, the thread waits (0.5 s, doubling up to 30 s) and tries
the same operation again, so nothing is skipped or reordered; `outages` counts the times the server
went away. A request the server refuses (retrying cannot help) is kept in `rejected`.

The bound. At most `max_queued` operations wait in memory. Past it, submit() appends the operation's
record (JSON) to a journal on disk, `overflow.jsonl` in the spill folder, and returns: it never waits
for the server, so Tune's event loop is never held back (a line of JSON, ~0.1 ms). From then on every
new operation goes to the journal, behind the older ones, and the threads read the journal back in
order (`rebuild` turns a record into the operation again) as the queue drains. So the driver's
memory stays flat through an outage of any length and nothing is dropped. This was chosen over
making submit() wait for room: a slow or absent server would then slow the sweep itself, which
tracking must never do. Files an operation uploads are already copies on local disk (the checkpoint
they came from may be deleted by Tune meanwhile): those are what a long outage costs, on disk.
Without `rebuild` the queue is not bounded.

The end. What is still unwritten when the sweep ends (a flush deadline passed) is saved to the spill
folder as JSON lines plus copies of the files (`unsent.jsonl`), and the end of the sweep says so.
"""
from __future__ import annotations

import heapq
import itertools
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
BARRIER = "\0barrier"  # the key of barrier operations: among themselves, in order


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
    record: dict = field(default_factory=dict)  # what it writes, as JSON: the journal, the spill file, rebuild()
    files: list[Path] = field(default_factory=list)  # local files it uploads (kept until written)
    key: str = ""  # operations of one key are performed in order, one at a time (one run: one key)
    barrier: bool = False  # after everything submitted before it, before everything submitted after it
    combine: Callable[[list[Operation]], Operation] | None = None  # several queued ones of a key as one
    seq: int = field(default=0, compare=False)  # submission order (set by the writer)


def _refused(error: str) -> Callable[[], None]:
    def perform() -> None:
        raise ValueError(error)
    return perform


class ResilientWriter:
    """Performs operations on background threads, in order per key, retrying transient failures."""

    BATCH = 50  # operations combined into one at most
    OVERFLOW = "overflow.jsonl"

    def __init__(self, spill_dir: Path, first_wait: float = 0.5, longest_wait: float = 30.0, threads: int = 4,
                 max_queued: int = 2000, rebuild: Callable[[dict], Operation] | None = None) -> None:
        self.spill_dir = Path(spill_dir)
        self.first_wait, self.longest_wait = first_wait, longest_wait
        self.max_queued, self.rebuild = max(1, max_queued), rebuild
        self._condition = threading.Condition()
        self._keys: dict[str, deque[Operation]] = {}  # in memory, per key, in order; the head may be in flight
        self._ready: list[tuple[int, str]] = []  # (seq of the head, key) of keys with nothing in flight
        self._queued = 0  # operations in memory (in flight included)
        self._in_flight = 0
        self._barrier_running = False
        self._seq = 0
        self._closing = False
        self._deadline = float("inf")
        self._wake = threading.Event()  # ends the retry waits once the sweep's flush deadline passed
        self._away_since: float | None = None  # the server went away (the first failure of this outage)
        self._back_at = float("-inf")  # it answered again (attempts started before failed in the old outage)
        self._journal: Path = self.spill_dir / self.OVERFLOW
        self._journal_out = self._journal_in = None
        self._journaled = 0  # operations in the journal not read back yet
        self._tail: deque[Operation] = deque()  # behind the journal, when it could not be written (disk full)
        self.rejected: list[tuple[Operation, str]] = []  # refused by the server: retrying cannot help
        self.outages = 0  # times the server went away
        self.written = 0  # operations performed
        self.peak = 0  # most operations in memory at once
        self.spilled = 0  # operations that went through the journal
        self._set_aside_old_journal()
        self._threads = [threading.Thread(target=self._work, name=f"tracking-writer-{n}", daemon=True)
                         for n in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    # ---- the driver's side: never waits on the server ---------------------------------------

    def submit(self, operation: Operation) -> None:
        with self._condition:
            if self.rebuild is None or not (self._journaled or self._tail or self._queued >= self.max_queued):
                self._enqueue(operation)
            elif self._tail or not self._to_journal(operation):
                self._tail.append(operation)  # in memory after all, rather than lost
            self._condition.notify_all()

    @property
    def pending(self) -> int:
        """Operations not written yet: in memory and in the journal."""
        with self._condition:
            return self._queued + self._journaled + len(self._tail)

    @property
    def queued(self) -> int:
        """Operations waiting in memory (at most max_queued when the queue is bounded)."""
        with self._condition:
            return self._queued

    def describe(self) -> str:
        bound = f"at most {self.max_queued} in memory, then a journal on disk" if self.rebuild else "unbounded"
        return f"{len(self._threads)} threads, in order per run, {bound}"

    def _enqueue(self, operation: Operation) -> None:  # under the lock
        operation.seq = self._seq
        self._seq += 1
        key = BARRIER if operation.barrier else operation.key
        queue = self._keys.get(key)
        if queue is None:
            queue = self._keys[key] = deque()
        queue.append(operation)
        if len(queue) == 1:  # nothing of this key in flight
            heapq.heappush(self._ready, (operation.seq, key))
        self._queued += 1
        self.peak = max(self.peak, self._queued)

    def _to_journal(self, operation: Operation) -> bool:  # under the lock
        try:
            if self._journal_out is None:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                self._journal_out = self._journal.open("a")
                self._journal_in = self._journal.open()
                log.warning("tracking is %d writes behind; the next ones wait in %s and are written in order as "
                            "the queue drains (nothing is lost, the sweep is not held back)", self._queued,
                            self._journal)
            self._journal_out.write(json.dumps(operation.record, default=str) + "\n")
            self._journal_out.flush()
        except OSError as error:  # (a partial line stays last: only whole lines are read back)
            log.warning("tracking's journal %s could not be written (%s); the writes behind it wait in memory",
                        self._journal, error)
            return False
        self._journaled += 1
        self.spilled += 1
        return True

    def _read_back(self, most: int) -> list[Operation]:  # under the lock
        operations = []
        for _ in range(min(most, self._journaled)):
            line = self._journal_in.readline()
            self._journaled -= 1
            try:
                record = json.loads(line)
                operations.append(self.rebuild(record))
            except Exception as error:  # noqa: BLE001 - kept, with why, in the spill file
                operations.append(Operation("a queued write", _refused(str(error)), {"line": line}))
        while self._tail and not self._journaled and len(operations) < most:
            operations.append(self._tail.popleft())
        if not self._journaled and self._journal_out is not None:
            self._journal_out.close()
            self._journal_in.close()
            self._journal_out = self._journal_in = None
            self._journal.unlink(missing_ok=True)
            log.warning("tracking caught up with its journal; the last %d writes are in memory",
                        self._queued + len(operations))
        return operations

    def _set_aside_old_journal(self) -> None:
        if self._journal.exists() and self._journal.stat().st_size:
            kept = self._journal.with_name(f"overflow-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            self._journal.rename(kept)
            log.warning("%s holds writes an earlier driver did not make; kept as %s", self._journal, kept)

    # ---- the threads ---------------------------------------------------------------------

    def _take(self) -> tuple[str, list[Operation]] | None:  # under the lock
        if (self._journaled or self._tail) and self._queued <= self.max_queued // 2:
            # A hundred at a time at most: submit() waits for this lock meanwhile.
            for operation in self._read_back(min(100, self.max_queued - self._queued)):
                self._enqueue(operation)
        if self._barrier_running or not self._ready:
            return None
        _, key = self._ready[0]
        queue = self._keys[key]
        if queue[0].barrier and self._in_flight:
            return None  # a barrier waits for everything before it
        heapq.heappop(self._ready)
        batch = [queue[0]]
        if batch[0].combine is not None:
            for operation in itertools.islice(queue, 1, self.BATCH):
                if operation.combine != batch[0].combine:  # (bound methods: equal, not identical)
                    break
                batch.append(operation)
        self._in_flight += 1
        self._barrier_running = batch[0].barrier
        return key, batch

    def _work(self) -> None:
        while True:
            with self._condition:
                while True:
                    if self._closing and (self._deadline_passed() or not self.pending):
                        return
                    taken = self._take()
                    if taken is not None:
                        break
                    self._condition.wait()
            key, batch = taken
            try:
                operation = batch[0] if len(batch) == 1 else batch[0].combine(batch)
            except Exception:  # noqa: BLE001 - then one at a time
                log.exception("tracking: could not combine %d writes", len(batch))
                batch, operation = batch[:1], batch[0]
            outcome = self._perform(operation)
            with self._condition:
                self._in_flight -= 1
                self._barrier_running = False
                queue = self._keys[key]
                if outcome is None:  # the flush deadline passed while the server was away: stays queued
                    heapq.heappush(self._ready, (queue[0].seq, key))
                    self._condition.notify_all()
                    return
                for _ in batch:
                    queue.popleft()
                self._queued -= len(batch)
                if outcome == "":
                    self.written += len(batch)
                else:
                    self.rejected += [(done, outcome) for done in batch]
                if queue:
                    heapq.heappush(self._ready, (queue[0].seq, key))
                else:
                    del self._keys[key]
                self._condition.notify_all()

    def _perform(self, operation: Operation) -> str | None:
        """The outcome: "" once written, why when refused, None when the flush deadline passed with the
        server away (the operation stays queued)."""
        wait = self.first_wait
        while True:
            started = time.monotonic()
            try:
                operation.perform()
            except Exception as error:  # noqa: BLE001 - every failure is either retried or recorded
                if not is_transient(error):
                    log.warning("tracking write refused and saved: %s: %s", operation.describe, error)
                    return f"{type(error).__name__}: {error}"
                self._went_away(error, started)
                if self._wake.wait(wait):  # close(): the flush deadline passed with the server still away
                    return None
                wait = min(wait * 2, self.longest_wait)
                continue
            self._came_back(started)
            return ""

    def _went_away(self, error: BaseException, started: float) -> None:
        with self._condition:
            if self._away_since is None and started >= self._back_at:  # (not a late failure of the last outage)
                self._away_since = time.monotonic()
                self.outages += 1
                log.warning("tracking server unreachable (%s); %d writes queued, retrying",
                            str(error).splitlines()[0][:200] if str(error) else type(error).__name__,
                            self._queued + self._journaled)

    def _came_back(self, started: float) -> None:
        with self._condition:
            if self._away_since is not None and started >= self._away_since:
                self._away_since, self._back_at = None, time.monotonic()
                log.warning("tracking server back; writing the %d queued writes", self._queued + self._journaled)

    def _deadline_passed(self) -> bool:
        return time.monotonic() >= self._deadline

    # ---- the end -------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted is written (True) or `timeout` seconds passed (False)."""
        end = time.monotonic() + timeout
        with self._condition:
            while self.pending and time.monotonic() < end:
                self._condition.wait(min(0.2, max(0.0, end - time.monotonic())))
            return not self.pending

    def close(self, timeout: float) -> str | None:
        """Flush for up to `timeout` s, stop, save what is left; a summary when something was not written."""
        self._deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._wake.set()
        end = time.monotonic() + 5
        for thread in self._threads:
            thread.join(timeout=max(0.0, end - time.monotonic()))
        with self._condition:
            left = sorted((op for queue in self._keys.values() for op in queue), key=lambda op: op.seq)
            left += self._read_back(self._journaled + len(self._tail))  # the newest ones, in the journal
            self._keys.clear()
            self._ready.clear()
            self._queued = 0
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
            lines.append(json.dumps({"what": operation.describe, "why": reason, **operation.record, "files": copies},
                                    default=str))
        journal = self.spill_dir / "unsent.jsonl"
        with journal.open("a") as out:
            out.write("\n".join(lines) + "\n")
        return (f"{len(unsent)} tracking writes could not be made ({unsent[0][1]}); they are saved in {journal} "
                f"(files under {self.spill_dir / 'files'}): nothing is lost")
