"""Screenshots of the MLflow UI showing a finished sweep, for docs/tracking.md.

    cd /tmp/somewhere && python -m orchestrator.sweep        # the quickstart, tracked in ./mlflow.db
    python experiments/mlflow_screenshots.py /tmp/somewhere quickstart

Starts `mlflow ui` on that folder's store (127.0.0.1, a free port) and drives a headless Chromium
(Debian's packages `chromium` and `chromium-driver`, through Selenium) with the waits of
tests/browser.py: every picture is taken once the page drew what it shows (the charts' points, the
image's pixels). Into docs/img/: mlflow_compare.png (the compare page of the trials),
mlflow_compare_charts.png (the experiment's chart view: the val metrics of every trial over the
epochs), mlflow_metric_charts.png (the best trial's model metrics), mlflow_trial_overlay.png (its CAM
overlay artifact), mlflow_sweep_report.png (the parent run's report mosaic).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import browser  # noqa: E402
from mlflow_server import free_port  # noqa: E402

IMAGES = ROOT / "docs" / "img"
REPORT = "report/cam_best_vs_baseline.png"


def start_ui(folder: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` on the folder's sqlite store, as a user runs it there; its address once it answers."""
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--host", "127.0.0.1", "--port",
                               str(port), "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"],
                              cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return server, base
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGTERM)
    raise RuntimeError("mlflow ui did not answer in 120 s")


def viewport(driver, width: int, height: int) -> None:
    """Make the page area (what a screenshot holds) width x height: the window adds its own frame."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    driver.set_window_size(2 * width - inner[0], 2 * height - inner[1])


def shoot(driver, name: str) -> None:
    """The page from its top: the waits scrolled its panes to draw each chart, the mouse is moved off
    what it last clicked (whose tooltip would show)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    driver.execute_script("for (const e of document.querySelectorAll('*')) if (e.scrollTop > 0) e.scrollTop = 0;")
    mouse = ActionBuilder(driver)
    mouse.pointer_action.move_to_location(1, 1)  # the window's corner: blank
    mouse.perform()
    driver.save_screenshot(str(IMAGES / name))
    print(f"{IMAGES / name} <- {driver.current_url}")


def every_chart_complete(driver, histories: dict[str, dict[str, int]]) -> bool:
    """Each chart on the page drew a line for each run of `histories` (run name -> metric -> steps
    logged) with a point per logged step. Scrolls to each chart in turn: plotly draws one only in view."""
    cards = driver.find_elements("css selector", browser.CHART_CARD)
    for card in cards:
        metric = card.find_element("css selector", "h4").get_attribute("title")
        browser.chart_card(driver, metric)
        if browser.drawn_points(driver, card) != {name: steps[metric] for name, steps in histories.items()}:
            return False
    return bool(cards)


def show_every_trial(driver, parent_id: str) -> None:
    """The chart view draws the first 10 runs: show them all, but the sweep's own run, which has no metric
    of its own and would only add an empty entry to each legend."""
    driver.find_element("css selector", "button[aria-label='Toggle visibility of runs']").click()
    browser.wait_for(driver, lambda d: [e for e in d.find_elements("css selector", "[role=menuitemradio]")
                                        if e.text == "Show all runs"], "the visibility menu")[0].click()
    eye = f"{browser.RUN_ROW}[row-id='{parent_id}'] label:has(.is-visibility-toggle-checkbox)"
    driver.find_element("css selector", eye).click()


def compare_page(driver, base: str, experiment: str, trials: list) -> None:
    viewport(driver, 1600, 1300)
    browser.open_page(driver, browser.compare_url(base, experiment, [r.info.run_id for r in trials]))
    browser.wait_for(driver, lambda d: d.find_elements("css selector", ".parcoords .axis-title"),
                     "the axes of the parallel coordinates")
    shoot(driver, "mlflow_compare.png")


def chart_view(driver, base: str, experiment: str, parent_id: str, histories: dict[str, dict[str, int]]) -> None:
    viewport(driver, 1600, 1050)
    browser.open_page(driver, browser.chart_view_url(base, experiment))
    browser.expand_child_runs(driver)
    show_every_trial(driver, parent_id)
    browser.search_charts(driver, "val/maxboxacc")
    browser.wait_for(driver, lambda d: every_chart_complete(d, histories), "every chart drawn")
    shoot(driver, "mlflow_compare_charts.png")


def metric_charts(driver, base: str, experiment: str, run, histories: dict[str, int]) -> None:
    viewport(driver, 1600, 1750)
    browser.open_page(driver, browser.run_url(base, experiment, run.info.run_id, "model-metrics"))
    browser.search_charts(driver, "val/")
    browser.wait_for(driver, lambda d: every_chart_complete(d, {run.info.run_name: histories}), "every chart drawn")
    shoot(driver, "mlflow_metric_charts.png")


def artifact(driver, base: str, experiment: str, run, path: str, name: str) -> None:
    viewport(driver, 1600, 1100)
    browser.open_page(driver, browser.run_url(base, experiment, run.info.run_id, f"artifacts/{path}"))
    browser.shown_image(driver, path)
    shoot(driver, name)


def main() -> None:
    folder, sweep = Path(sys.argv[1]).resolve(), sys.argv[2]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(sweep).experiment_id
    runs = client.search_runs([experiment])
    parent = next(r for r in runs if r.data.tags.get("has_sweep.role") == "sweep")
    trials = [r for r in runs if r.data.tags.get("has_sweep.role") == "trial"]
    best = max(trials, key=lambda r: r.data.metrics.get("test/maxboxacc_v2", 0))
    histories = {r.info.run_name: {m: len(client.get_metric_history(r.info.run_id, m)) for m in r.data.metrics}
                 for r in trials}
    last_epoch = sorted(a.path for a in client.list_artifacts(best.info.run_id, "evaluations"))[-1]
    server, base = start_ui(folder)
    driver = browser.start()
    try:
        browser.close_assistant(driver, base)
        compare_page(driver, base, experiment, trials)
        chart_view(driver, base, experiment, parent.info.run_id, histories)
        metric_charts(driver, base, experiment, best, histories[best.info.run_name])
        artifact(driver, base, experiment, best, f"{last_epoch}/test_cam_overlay.png", "mlflow_trial_overlay.png")
        artifact(driver, base, experiment, parent, REPORT, "mlflow_sweep_report.png")
    finally:
        driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
