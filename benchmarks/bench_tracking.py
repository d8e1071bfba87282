"""Tracking at sweep scale: a SweepTracker driven as the Tune callback drives it, against a real `mlflow server`.

    python benchmarks/bench_tracking.py                               # 100 trials x 10 epochs, as fast as possible
    python benchmarks/bench_tracking.py --trials 1000 --epochs 10     # the issue's scale (~15 min, ~25 GB of disk)
    python benchmarks/bench_tracking.py --trials 300 --rate 10        # offered at the target rate: the queue stays flat

The "sweep" is synthetic, the rest is real: a local `mlflow server` (sqlite store, proxied artifacts,
as cluster/start_mlflow.sh runs it), real epoch checkpoint folders of a short engine run (PNGs,
Parquet, config, metrics, state.pt) and the tracker's own code. `--concurrent` trials run at once and
their results interleave, as in a sweep; each result is what MlflowCallback does per epoch:
log_metrics and log_evaluation (the checkpoint's artifacts); each trial starts with start_trial and
ends with log_model (its state_dict) and end_trial.

Printed: offered and sustained (written) results/s, the driver's cost per result (what Tune's event
loop pays) and the longest garbage collection, the queue's peak length in memory and through the
journal, the process's RSS and the staging folder's size (the copies that wait to be written), the
time to flush at the end, bytes fetched per trial-epoch against the checkpoint's size, the CPU the
server and this process spent per result, and a check that every run, metric and artifact folder
reached the server. Figures and what they mean: docs/benchmarks.md, "Tracking at sweep scale".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from mlflow_server import MlflowServer  # noqa: E402  (tests/, the same server the tests use)

PAGE = os.sysconf("SC_PAGE_SIZE")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # 1,000 "View run" lines otherwise


def group_cpu_seconds(group: int) -> float:
    """CPU seconds (user + system) of the live processes of a process group: the server and its workers."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group:  # pgrp
                total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_checkpoints(folder: Path, epochs: int) -> list[Path]:
    """One folder per epoch, from a real 2-epoch engine run: val artifacts every epoch, test ones at the last."""
    from trainers.checkpoint import list_checkpoints
    from trainers.config import RunConfig
    from trainers.engine import Trainer

    run = folder / "run"
    config = RunConfig.from_dict({}, [f"output_dir={run}", "data.synthetic.train_size=128",
                                      "data.synthetic.val_size=32", "data.synthetic.test_size=32", "optim.epochs=2",
                                      "eval.test_interval=0.01", "progress=false"])
    Trainer(config).fit()
    middle, last = list_checkpoints(run / "checkpoints")
    folders = []
    for epoch in range(1, epochs + 1):
        target = folder / "checkpoints" / f"epoch_{epoch:04d}"
        shutil.copytree(last if epoch == epochs else middle, target)
        metrics = json.loads((target / "metrics.json").read_text())
        metrics["epoch"] = float(epoch)
        metrics["val/maxboxacc_v2"] = 20.0 + 3.0 * epoch if epoch % 3 else 20.0  # a new best at most epochs
        (target / "metrics.json").write_text(json.dumps(metrics))
        folders.append(target)
    return folders


def folder_size(path: Path, skip: str | None = None) -> int:
    total = 0
    for root, _, names in os.walk(path):  # (the writer removes folders meanwhile)
        for name in names:
            if name != skip:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
    return total


class Sampler:
    """Every 0.2 s: the queue's length and the RSS; every 2 s the staging folder's size on disk."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self.peak_pending = self.peak_rss = self.peak_staging = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE

    def _run(self) -> None:
        tick = 0
        while not self.stop.wait(0.2):
            self.peak_pending = max(self.peak_pending, self.tracker.writer.pending)
            self.peak_rss = max(self.peak_rss, self.rss())
            if tick % 10 == 0:
                self.peak_staging = max(self.peak_staging, folder_size(self.tracker.staging))
            tick += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def sweep_order(trials: int, epochs: int, concurrent: int):
    """(trial index, epoch) in the order a sweep reports them: `concurrent` trials at once, round robin,
    the next trial starting when one finishes."""
    running = list(range(min(concurrent, trials)))
    following = len(running)
    epoch_of = {t: 0 for t in running}
    while running:
        for trial in list(running):
            epoch_of[trial] += 1
            yield trial, epoch_of[trial]
            if epoch_of[trial] == epochs:
                running.remove(trial)
                if following < trials:
                    running.append(following)
                    epoch_of[following] = 0
                    following += 1


class GcPauses:
    """The longest garbage collection of the run (it stops every thread, the driver's calls included)."""

    def __init__(self) -> None:
        import gc

        self.longest, self.generation, self._start = 0.0, -1, 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif time.perf_counter() - self._start > self.longest:
            self.longest, self.generation = time.perf_counter() - self._start, info["generation"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def check_server(uri: str, sweep: str, trials: int, epochs: int, every: int) -> str:
    """Every run there, finished, with every epoch's metrics and artifacts (a sample of 20 trials for the last two)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep)
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    children = [r for r in runs if r.data.tags.get("has_sweep.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("has_sweep.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    assert len(children) == trials, (len(children), trials)
    assert all(r.info.status == "FINISHED" and r.data.tags.get("status") == "completed" for r in children)
    step = max(1, trials // 20)
    for run in sorted(children, key=lambda r: r.data.tags["trial_id"])[::step]:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/maxboxacc_v2")]
        assert steps == list(range(1, epochs + 1)), (run.data.tags["trial_id"], steps)
        folders = {a.path for a in client.list_artifacts(run.info.run_id, "evaluations")}
        wanted = {f"evaluations/epoch_{e:04d}" for e in range(1, epochs + 1) if e % every == 0 or e == epochs}
        assert folders == wanted, (run.data.tags["trial_id"], sorted(folders))
        assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/state_dict.pt"}
    return f"server check: 1 parent + {len(children)} children FINISHED; metrics and artifacts complete in " \
           f"{len(range(0, trials, step))} sampled trials"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=64, help="trials running at once (results interleave)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="results/s offered by the sweep; 0: as fast as possible")
    parser.add_argument("--artifacts-every", type=int, default=1, help="log_evaluation every N epochs (and the last)")
    parser.add_argument("--server-workers", type=int, default=2, help="mlflow server worker processes")
    parser.add_argument("--writers", type=int, default=None, help="writer threads (default: the tracker's)")
    parser.add_argument("--max-queued", type=int, default=None, help="writes held in memory (default: the tracker's)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="server store and checkpoints (default: a temp folder, removed at the end)")
    args = parser.parse_args()

    import pyarrow.fs as pafs

    from orchestrator.checkpoint_files import CheckpointLocation
    from trainers.config import RunConfig
    from trainers.config_parse import flatten

    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    folder.mkdir(parents=True, exist_ok=True)
    server = MlflowServer(folder / "server", workers=args.server_workers)
    filesystem = pafs.LocalFileSystem()
    try:
        checkpoints = make_checkpoints(folder, args.epochs)
        server.start()
        import orchestrator.tracking as tracking
        from orchestrator.tracking import SweepTracker

        if args.writers is not None:
            tracking.WRITER_THREADS = args.writers
        if args.max_queued is not None:
            tracking.MAX_QUEUED_WRITES = args.max_queued
        sweep = f"bench-{args.trials}x{args.epochs}-{int(time.time())}"
        tracker = SweepTracker(server.uri, sweep, folder / "spill")
        params = flatten(RunConfig.from_dict({}).to_dict())
        metrics = [json.loads((f / "metrics.json").read_text()) for f in checkpoints]
        report = folder / "report"
        report.mkdir(exist_ok=True)
        (report / "table.txt").write_text("a report\n")
        rss_before = Sampler.rss()
        sampler = Sampler(tracker)
        pauses = GcPauses()
        result_costs: list[float] = []
        other_costs: list[float] = []
        evaluations = 0

        server_cpu, own_cpu = group_cpu_seconds(server.process.pid), own_cpu_seconds()
        start = time.perf_counter()
        tracker.start_sweep({"metric": "val/maxboxacc_v2"}, {"sweep.yaml": "name: bench\n"})
        for index, (trial, epoch) in enumerate(sweep_order(args.trials, args.epochs, args.concurrent)):
            if args.rate > 0:
                delay = start + index / args.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            trial_id = f"{trial:05d}"
            if epoch == 1:
                began = time.perf_counter()
                tracker.start_trial(trial_id, f"trial {trial_id}", {**params, "seed": trial})
                other_costs.append(time.perf_counter() - began)
            began = time.perf_counter()
            tracker.log_metrics(trial_id, metrics[epoch - 1], epoch)
            if epoch % args.artifacts_every == 0 or epoch == args.epochs:
                tracker.log_evaluation(trial_id, CheckpointLocation(filesystem, str(checkpoints[epoch - 1])))
                evaluations += 1
            result_costs.append(time.perf_counter() - began)
            if epoch == args.epochs:
                began = time.perf_counter()
                tracker.log_model(trial_id, CheckpointLocation(filesystem, str(checkpoints[-1])))
                tracker.end_trial(trial_id, "FINISHED", {"status": "completed"})
                other_costs.append(time.perf_counter() - began)
        tracker.log_parent_files(report, "report")
        offered_end = time.perf_counter()
        summary = tracker.end_sweep("FINISHED", flush_timeout=7200)
        end = time.perf_counter()
        server_cpu, own_cpu = group_cpu_seconds(server.process.pid) - server_cpu, own_cpu_seconds() - own_cpu
        sampler.close()
        assert summary is None, summary

        results = args.trials * args.epochs
        submit, flush, total = offered_end - start, end - offered_end, end - start
        state = (checkpoints[-1] / "state.pt").stat().st_size
        per_epoch = (tracker.fetched.bytes - args.trials * state) / evaluations
        whole = statistics.mean(folder_size(f) for f in checkpoints)
        small = statistics.mean(folder_size(f, skip="state.pt") for f in checkpoints)
        writer = tracker.writer
        print(f"sweep {args.trials} trials x {args.epochs} epochs, {args.concurrent} at once, artifacts every "
              f"{args.artifacts_every} epoch(s) ({evaluations} evaluations), offered rate "
              f"{'as fast as possible' if args.rate <= 0 else f'{args.rate:g}/s'}, "
              f"server workers {args.server_workers}")
        print(f"writer: {getattr(writer, 'describe', lambda: type(writer).__name__)()}")
        print(f"offered     {results / submit:10.1f} results/s  ({results} results in {submit:.1f} s)")
        print(f"sustained   {results / total:10.1f} results/s  (all written {total:.1f} s after the first)")
        print(f"flush       {flush:10.1f} s at the end (end_sweep)")
        print(f"driver      {1000 * statistics.median(result_costs):10.2f} ms per result (median), "
              f"p99 {1000 * percentile(result_costs, 0.99):.2f} ms, max {1000 * max(result_costs):.1f} ms; "
              f"start/end of a trial median {1000 * statistics.median(other_costs):.2f} ms, "
              f"max {1000 * max(other_costs):.1f} ms; total {sum(result_costs) + sum(other_costs):.1f} s; longest "
              f"garbage collection {1000 * pauses.longest:.0f} ms (generation {pauses.generation})")
        print(f"queue       peak {getattr(writer, 'peak', sampler.peak_pending)} operations in memory, backlog peak "
              f"{sampler.peak_pending} (memory + journal); {getattr(writer, 'spilled', 0)} went through the journal")
        print(f"memory      RSS {rss_before / 2**20:.0f} MiB before, peak {sampler.peak_rss / 2**20:.0f} MiB "
              f"(ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB); staging on disk "
              f"peak {sampler.peak_staging / 2**20:.0f} MiB")
        print(f"fetched     {per_epoch / 1e3:10.1f} kB per trial-epoch with artifacts, of a {whole / 1e3:.1f} kB "
              f"checkpoint ({small / 1e3:.1f} kB without state.pt); the model {state / 1e3:.1f} kB once per trial; "
              f"{tracker.fetched.bytes / 1e9:.2f} GB in all")
        print(f"cpu         server {1000 * server_cpu / results:.0f} ms per result ({server_cpu:.0f} s), this process "
              f"{1000 * own_cpu / results:.0f} ms per result ({own_cpu:.0f} s); load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end")
        print(f"outages {writer.outages}, rejected {len(writer.rejected)}")
        print(check_server(server.uri, sweep, args.trials, args.epochs, args.artifacts_every))
    finally:
        server.stop()
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
