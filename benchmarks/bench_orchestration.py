"""Orchestration overhead of a sweep: its wall time against the trials' own time, on this machine.

    python benchmarks/bench_orchestration.py                 # the quickstart, as a newcomer runs it
    python benchmarks/bench_orchestration.py --asha          # ASHA vs the full grid on 10 configurations

Overhead = wall time x concurrent trials / sum of the trials' own time (Tune's time_total_s:
from the trial function's start to its end, data and evaluations included); 1.0 is no overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASHA_SPACE = """
name: {name}
base:
  data: {{synthetic: {{train_size: 3000, val_size: 300, test_size: 500}}, batch_size: 128}}
  optim: {{epochs: 8}}
  eval: {{test_interval: 0.01}}
  threads: 1
space:
  has.mixture: {{grid: [none, "24"]}}
  optim.lr: {{grid: [0.02, 0.05, 0.1, 0.2, 0.4]}}
seeds: [0]
scheduler: {scheduler}
max_concurrent_trials: 2
"""


def run(args: list[str], folder: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "orchestrator.sweep", *args, "--storage-path", str(folder / "rr"),
                           "--no-tracking"], cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    print(done.stdout[done.stdout.rindex("sweep "):])
    return time.perf_counter() - start


def trials(experiment: Path) -> list[dict]:
    found = []
    for result in sorted(experiment.glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        found.append(lines[-1])
    return found


def overhead(folder: Path, name: str, wall: float, concurrent: int) -> None:
    own = [t["time_total_s"] for t in trials(folder / "rr" / name)]
    print(f"| {name} | {len(own)} | {wall:.0f} | {sum(own):.0f} | {concurrent} | "
          f"{wall * concurrent / sum(own):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asha", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    if not args.asha:
        wall = run([], folder)
        print("| sweep | trials | wall (s) | sum of trial times (s) | concurrent | overhead |")
        print("|---|---|---|---|---|---|")
        overhead(folder, "quickstart", wall, 2)
        return
    results = {}
    for name, scheduler in (("grid", "{name: fifo}"), ("asha", "{name: asha, grace_period: 2, reduction_factor: 2}")):
        space = folder / f"{name}.yaml"
        space.write_text(ASHA_SPACE.format(name=name, scheduler=scheduler))
        wall = run(["--space", str(space)], folder)
        done = trials(folder / "rr" / name)
        best = max(done, key=lambda t: t.get("val/maxboxacc_v2", -1))
        results[name] = (wall, sum(t["training_iteration"] for t in done), sum(t["time_total_s"] for t in done),
                         best["config"]["grid"])
    print("| scheduler | wall (s) | epochs trained | trial time (s) | best on val |")
    print("|---|---|---|---|---|")
    for name, (wall, epochs, seconds, best) in results.items():
        print(f"| {name} | {wall:.0f} | {epochs} | {seconds:.0f} | {best} |")
    saving = 1 - results["asha"][1] / results["grid"][1]
    print(f"ASHA trained {saving:.0%} fewer epochs; same best configuration: {results['asha'][3] == results['grid'][3]}")


if __name__ == "__main__":
    main()
