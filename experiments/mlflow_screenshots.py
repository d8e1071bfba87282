"""Screenshots of the MLflow UI showing a finished sweep, for docs/tracking.md.

    cd /tmp/somewhere && python -m orchestrator.sweep        # the quickstart, tracked in ./mlflow.db
    python experiments/mlflow_screenshots.py /tmp/somewhere quickstart

Starts `mlflow ui` on that folder's store (127.0.0.1, a free port) and takes the pictures with a
headless Chromium (Debian's package `chromium`), into docs/img/mlflow_*.png: the run-compare view of
the trials, a trial's CAM overlay artifact, the sweep's report mosaic. (The UI's metric charts load
lazily and do not render in a headless screenshot.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mlflow_server import free_port  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def shoot(url: str, path: Path, size: str = "1600,1000", wait_ms: int = 20000) -> None:
    profile = tempfile.mkdtemp(prefix="chromium-")
    subprocess.run([shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                    f"--window-size={size}", f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                   check=True, capture_output=True, timeout=180)
    shutil.rmtree(profile, ignore_errors=True)
    print(f"{path} <- {url}")


def main() -> None:
    folder, sweep = Path(sys.argv[1]).resolve(), sys.argv[2]
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--host", "127.0.0.1", "--port",
                               str(port), "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(sweep).experiment_id
        runs = client.search_runs([experiment])
        parent = next(r for r in runs if r.data.tags.get("has_sweep.role") == "sweep")
        children = [r for r in runs if r.data.tags.get("has_sweep.role") == "trial"]
        best = max(children, key=lambda r: r.data.metrics.get("test/maxboxacc_v2", 0))
        images = ROOT / "docs" / "img"
        ids = json.dumps([r.info.run_id for r in children])
        shoot(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}",
              images / "mlflow_compare.png", size="1600,1400")
        epochs = sorted(a.path for a in client.list_artifacts(best.info.run_id, "evaluations"))
        shoot(f"{base}/#/experiments/{experiment}/runs/{best.info.run_id}/artifacts/{epochs[-1]}/test_cam_overlay.png",
              images / "mlflow_trial_overlay.png", size="1600,1100")
        shoot(f"{base}/#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts/report/cam_best_vs_baseline.png",
              images / "mlflow_sweep_report.png", size="1600,1100")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
