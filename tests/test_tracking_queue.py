"""The tracking writer: order within a run on several threads, barriers, the bound (a journal on disk),
outages, and nothing lost (fake operations), then a tracker past its bound through a real server outage."""
import json
import shutil
import threading
import time
from collections import defaultdict

import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

import orchestrator.tracking as tracking
from mlflow_server import MlflowServer
from orchestrator.checkpoint_files import CheckpointLocation
from orchestrator.tracking_queue import Operation, ResilientWriter


class Server:
    """A fake server: performs record writes into `done`, can be down (ConnectionError) or held (a gate)."""

    def __init__(self) -> None:
        self.done: list[tuple[str, int]] = []
        self.down = False
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()
        self.running: dict[str, int] = defaultdict(int)
        self.most_at_once = 0
        self.most_per_key = 0
        self.calls = 0

    def write(self, records: list[dict]) -> None:
        key = records[0]["key"]
        with self.lock:
            self.calls += 1
            self.running[key] += 1
            self.most_per_key = max(self.most_per_key, self.running[key])
            self.most_at_once = max(self.most_at_once, sum(self.running.values()))
        try:
            self.gate.wait()
            time.sleep(0.002)
            if self.down:
                raise ConnectionError("Max retries exceeded: Connection refused")
            if any(r.get("bad") for r in records):
                raise ValueError("INVALID_PARAMETER_VALUE: refused")
            with self.lock:
                self.done += [(r["key"], r["n"]) for r in records]
        finally:
            with self.lock:
                self.running[key] -= 1

    def operation(self, record: dict) -> Operation:
        """What a tracker's record becomes (also when read back from the journal)."""
        return Operation(f"{record['key']} #{record['n']}", lambda: self.write([record]), record,
                         key=record["key"], barrier=record.get("barrier", False),
                         combine=self.combine if record.get("combine") else None)

    def combine(self, operations: list[Operation]) -> Operation:
        records = [op.record for op in operations]
        return Operation("batch", lambda: self.write(records), {}, key=operations[0].key)


def writer(tmp_path, server, **options) -> ResilientWriter:
    return ResilientWriter(tmp_path / "spill", first_wait=0.01, longest_wait=0.05, rebuild=server.operation, **options)


def submit(w: ResilientWriter, server: Server, key: str, n: int, **extra) -> None:
    w.submit(server.operation({"key": key, "n": n, **extra}))


def per_key(done):
    order = defaultdict(list)
    for key, n in done:
        order[key].append(n)
    return dict(order)


def test_operations_of_a_run_stay_in_order_while_runs_are_written_in_parallel(tmp_path):
    server = Server()
    w = writer(tmp_path, server, threads=4)
    for n in range(20):
        for key in ("a", "b", "c", "d", "e"):
            submit(w, server, key, n)
    assert w.close(30) is None
    assert per_key(server.done) == {key: list(range(20)) for key in "abcde"}
    assert server.most_per_key == 1  # never two operations of one run at once
    assert server.most_at_once >= 2  # runs in parallel
    assert w.written == 100 and w.pending == 0


def test_a_barrier_comes_after_everything_before_it_and_before_everything_after_it(tmp_path):
    server = Server()
    w = writer(tmp_path, server, threads=4)
    submit(w, server, "sweep", 0, barrier=True)
    for key in ("a", "b", "c"):
        for n in (1, 2):
            submit(w, server, key, n)
    submit(w, server, "sweep", 3, barrier=True)
    submit(w, server, "a", 4)
    assert w.close(30) is None
    done = server.done
    assert done[0] == ("sweep", 0) and done[7] == ("sweep", 3) and done[8] == ("a", 4)
    assert sorted(done[1:7]) == [(k, n) for k in "abc" for n in (1, 2)]


def test_past_the_bound_submit_goes_to_the_journal_at_once_and_every_write_comes_back_in_order(tmp_path):
    server = Server()
    server.gate.clear()  # the server holds the first request: nothing is written meanwhile
    w = writer(tmp_path, server, threads=1, max_queued=5)
    took = []
    for n in range(20):
        start = time.perf_counter()
        submit(w, server, "a", n)
        took.append(time.perf_counter() - start)
    assert (w.queued, w.pending, w.spilled) == (5, 20, 15)
    journal = tmp_path / "spill" / "overflow.jsonl"
    assert [json.loads(line)["n"] for line in journal.read_text().splitlines()] == list(range(5, 20))
    assert max(took) < 0.05  # never waits for the server
    server.gate.set()
    assert w.close(30) is None
    assert server.done == [("a", n) for n in range(20)]
    assert w.peak == 5 and not journal.exists()


def test_a_server_outage_past_the_bound_loses_nothing_and_keeps_each_run_in_order(tmp_path):
    server = Server()
    w = writer(tmp_path, server, threads=3, max_queued=4)
    submit(w, server, "sweep", 0, barrier=True)
    assert w.flush(10)
    server.down = True
    for n in range(1, 11):
        for key in ("a", "b", "c"):
            submit(w, server, key, n)
    deadline = time.monotonic() + 10
    while w.outages == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.outages == 1 and w.queued <= 4 and w.pending == 30
    server.down = False
    assert w.close(30) is None
    assert per_key(server.done) == {"sweep": [0], **{key: list(range(1, 11)) for key in "abc"}}
    assert w.outages == 1 and w.written == 31 and w.rejected == []


def test_queued_metrics_of_a_run_are_combined_into_one_write(tmp_path):
    server = Server()
    server.gate.clear()
    w = writer(tmp_path, server, threads=1)
    submit(w, server, "a", 0)  # held by the server
    for n in range(1, 6):
        submit(w, server, "a", n, combine=True)
    submit(w, server, "a", 6)  # not combinable: a write of its own
    server.gate.set()
    assert w.close(30) is None
    assert server.done == [("a", n) for n in range(7)]
    assert server.calls == 3 and w.written == 7


def test_a_refused_write_is_saved_and_the_others_go_on(tmp_path):
    server = Server()
    w = writer(tmp_path, server, threads=2)
    submit(w, server, "a", 0)
    submit(w, server, "a", 1, bad=True)
    submit(w, server, "a", 2)
    summary = w.close(30)
    assert server.done == [("a", 0), ("a", 2)]
    assert summary.startswith("1 tracking writes could not be made (ValueError: INVALID_PARAMETER_VALUE: refused)")
    lines = [json.loads(line) for line in (tmp_path / "spill" / "unsent.jsonl").read_text().splitlines()]
    assert [(line["key"], line["n"], line["what"]) for line in lines] == [("a", 1, "a #1")]


def test_what_the_server_never_got_is_saved_in_order_from_memory_and_journal(tmp_path):
    server = Server()
    server.down = True
    w = writer(tmp_path, server, threads=2, max_queued=3)
    for n in range(4):
        for key in ("a", "b"):
            submit(w, server, key, n)
    submit(w, server, "sweep", 9, barrier=True)
    assert w.spilled == 6
    summary = w.close(0.5)
    assert summary.startswith("9 tracking writes could not be made (the tracking server did not answer")
    lines = [json.loads(line) for line in (tmp_path / "spill" / "unsent.jsonl").read_text().splitlines()]
    assert [(line["key"], line["n"]) for line in lines] == [(k, n) for n in range(4) for k in "ab"] + [("sweep", 9)]
    assert server.done == []


def test_a_journal_left_by_an_earlier_driver_is_kept_aside_not_replayed(tmp_path):
    (tmp_path / "spill").mkdir()
    (tmp_path / "spill" / "overflow.jsonl").write_text('{"key": "old", "n": 0}\n')
    server = Server()
    w = writer(tmp_path, server, max_queued=1)
    server.gate.clear()
    submit(w, server, "a", 0)
    submit(w, server, "a", 1)  # to the journal, a fresh one
    server.gate.set()
    assert w.close(30) is None
    assert server.done == [("a", 0), ("a", 1)]
    kept = list((tmp_path / "spill").glob("overflow-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == '{"key": "old", "n": 0}\n'


def test_when_the_journal_cannot_be_written_the_writes_wait_in_memory_in_order(tmp_path):
    (tmp_path / "spill").write_text("a file where the spill folder should be")
    server = Server()
    server.gate.clear()
    w = writer(tmp_path, server, threads=1, max_queued=2)
    for n in range(6):
        submit(w, server, "a", n)
    assert (w.queued, w.pending, w.spilled) == (2, 6, 0)
    server.gate.set()
    assert w.close(30) is None
    assert server.done == [("a", n) for n in range(6)]


class FakeClient:
    """log_batch calls as (steps, number of values); the server away for the calls listed in `away`."""

    def __init__(self, away=()) -> None:
        self.calls, self.away, self.count = [], set(away), 0

    def log_batch(self, run_id, metrics=()):
        self.count += 1
        if self.count in self.away:
            raise ConnectionError("Connection refused")
        self.calls.append((sorted({m.step for m in metrics}), len(metrics)))


def test_combined_metrics_go_in_requests_of_at_most_1000_values_and_a_retry_skips_what_was_written(tmp_path):
    tracker = tracking.SweepTracker("http://127.0.0.1:9", "combined", tmp_path / "spill")
    tracker.trials["t0"] = handle = tracking.RunHandle("t0")
    handle.run_id = "run"
    tracker.client = FakeClient(away={2})
    records = [{"step": step, "metrics": {f"m{i}": float(step) for i in range(30)}, "timestamp": 0}
               for step in [*range(1, 6), 5, *range(6, 41)]]  # epoch 5 twice (a restored trial): logged once
    with pytest.raises(ConnectionError):
        tracker._log_epochs(handle, records)  # the second request finds the server away
    assert tracker.client.calls == [(list(range(1, 34)), 990)] and handle.last_step == 33
    tracker._log_epochs(handle, records)  # the writer's retry: the rest only
    assert tracker.client.calls[1:] == [(list(range(34, 41)), 210)] and handle.last_step == 40
    tracker.writer.close(0)
    shutil.rmtree(tracker.staging)


# ---- the tracker past its bound, through a real server outage ------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("server")).start()
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.extended  # default: test_tracking.py's server outage and the emulated server restart, every write in order
def test_a_tracker_past_its_bound_through_a_server_outage_writes_everything_in_order(server, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(tracking, "MAX_QUEUED_WRITES", 4)
    folder = tmp_path / "checkpoint"
    (folder / "artifacts").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"epoch": 3, "val/maxboxacc_v2": 50.0}))
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "artifacts" / "val_cam_overlay.png").write_bytes(b"\x89PNG picture")
    tracker = tracking.SweepTracker(server.uri, "bounded", tmp_path / "spill")
    tracker.start_sweep({}, {})
    for trial in ("t0", "t1"):
        tracker.start_trial(trial, trial, {"seed": trial})
    assert tracker.writer.flush(60)
    server.stop()
    try:
        for epoch in range(1, 7):
            for index, trial in enumerate(("t0", "t1")):
                tracker.log_metrics(trial, {"val/x": epoch + 10 * index}, epoch)
                if epoch == 3:
                    tracker.log_evaluation(trial, CheckpointLocation(pafs.LocalFileSystem(), str(folder)))
        for trial in ("t0", "t1"):
            tracker.end_trial(trial, "FINISHED", {"status": "completed"})
        assert tracker.writer.spilled > 0 and tracker.writer.queued <= 4
        assert (tmp_path / "spill" / "overflow.jsonl").exists()
    finally:
        server.start()
    assert tracker.end_sweep(flush_timeout=120) is None
    assert tracker.writer.outages == 1 and tracker.writer.peak <= 4
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("bounded").experiment_id])
    assert len(runs) == 3
    for index, trial in enumerate(("t0", "t1")):
        run = next(r for r in runs if r.data.tags.get("trial_id") == trial)
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
        history = client.get_metric_history(run.info.run_id, "val/x")
        assert [(m.step, m.value) for m in history] == [(e, e + 10.0 * index) for e in range(1, 7)]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluations/epoch_0003")] == \
            ["evaluations/epoch_0003/val_cam_overlay.png"]
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "spill" / "overflow.jsonl").exists()
