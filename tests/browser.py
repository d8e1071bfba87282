"""Headless Chromium driven by Selenium, and what the MLflow 3.17 UI draws, for tests/test_mlflow_ui.py
and experiments/mlflow_screenshots.py.

Every wait is a WebDriverWait on a DOM condition: the UI is a React app that fetches its data after
the page loads, and its charts are plotly divs that are drawn only once they are scrolled into view.
The selectors below are those of MLflow 3.17.2's UI bundle (mlflow/server/js/build).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import urllib.parse
from collections.abc import Callable
from typing import Any

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--hide-scrollbars")
WAIT_SECONDS = 60  # a page here draws in 1-5 s; room for 2 cores busy with other tests

# The experiment side-bar's entries in MLflow 3.17's two layouts of an experiment: model training (its
# runs and their charts) and GenAI (traces, judges, evaluation runs).
MODEL_TRAINING = ("Runs", "Models", "Traces")
GENAI = ("Overview", "Traces", "Sessions", "Judges", "Review", "Datasets", "Evaluation runs", "Playground",
         "Prompts", "Agent versions")
MODEL_TRAINING_QUERY = "workflowType=machine_learning"  # what the side-bar's "Model training" switch sets

CHART_CARD = "[data-testid=experiment-view-compare-runs-card]"
RUN_ROW = ".ag-row[row-id]"
CLOSE_ASSISTANT = "[data-component-id='mlflow.assistant.chat_panel.close']"
EXPAND_CHILD_RUNS = "[data-component-id$='runnamecellrenderer.tsx_46']"  # the (+) before a parent run's name


def missing() -> str | None:
    """Why no browser can be driven here (the package to install), or None."""
    if shutil.which("chromium") is None:
        return "no chromium: apt-get install chromium (Debian's package)"
    if shutil.which("chromedriver") is None:
        return "no chromedriver: apt-get install chromium-driver (Debian's package)"
    if importlib.util.find_spec("selenium") is None:
        return "no selenium: pip install selenium (the test extra)"
    return None


def start(width: int = 1600, height: int = 1000):
    """Debian's chromium through its own chromedriver (named, so Selenium Manager downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def wait_for(driver, condition: Callable[[Any], Any], what: str, seconds: float = WAIT_SECONDS) -> Any:
    """condition(driver)'s first truthy value; a TimeoutException naming `what` after `seconds`. An
    element React replaced while the condition read it (stale) means: not yet, ask again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(condition, f"waited {seconds} s for {what}")


def close_assistant(driver, base: str) -> None:
    """Shut the "MLflow Assistant" panel, which opens on a first visit and takes a third of the width; the
    browser keeps it shut (localStorage) for the next pages."""
    driver.get(f"{base}/#/")
    close = wait_for(driver, lambda d: d.find_elements("css selector", CLOSE_ASSISTANT), "the assistant panel")
    close[0].click()
    wait_for(driver, lambda d: not d.find_elements("css selector", CLOSE_ASSISTANT), "the assistant panel to close")


def open_page(driver, url: str) -> None:
    """Load `url` as a new document: going from one #/ address of the UI to another only changes the hash,
    and the last page's elements would still be there for the next wait to find."""
    driver.get("about:blank")
    driver.get(url)


# ---- pages ---------------------------------------------------------------------------------------

def experiment_url(base: str, experiment_id: str, query: str = "") -> str:
    return f"{base}/#/experiments/{experiment_id}" + (f"?{query}" if query else "")


def run_url(base: str, experiment_id: str, run_id: str, tab: str) -> str:
    """A tab of a run's page: "model-metrics" (its charts) or "artifacts/<path>" (an artifact shown)."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/{tab}?{MODEL_TRAINING_QUERY}"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """The "Compare" page of the selected runs: parallel coordinates of params and metrics, then a table."""
    return (f"{base}/#/compare-runs?runs={urllib.parse.quote(json.dumps(run_ids))}"
            f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}&{MODEL_TRAINING_QUERY}")


def chart_view_url(base: str, experiment_id: str) -> str:
    """The experiment page's "Chart" view: a chart per metric with a line per shown run."""
    return f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_QUERY}&compareRunsMode=CHART"


# ---- what a page shows ---------------------------------------------------------------------------

def side_bar(driver, experiment_id: str) -> tuple[str, ...]:
    """The experiment side-bar's entries in order, once its page (the current entry) is drawn."""
    def entries(driver):
        return driver.execute_script(
            "const links = Array.from(document.querySelectorAll(`nav a[href^='#/experiments/${arguments[0]}/']`));"
            "return links.some(a => a.getAttribute('aria-current') === 'page') ? links.map(a => a.innerText.trim())"
            " : null;", experiment_id)
    return tuple(wait_for(driver, entries, f"the side-bar of experiment {experiment_id}"))


def expand_child_runs(driver) -> None:
    """Show the parent run's children (the sweep's trials) below it, in the runs table or the chart view's
    list, unless the browser keeps them shown from an earlier visit (the (+) button toggles)."""
    def row_ids(driver):
        return {row.get_attribute("row-id") for row in driver.find_elements("css selector", RUN_ROW)}
    button = wait_for(driver, lambda d: d.find_elements("css selector", EXPAND_CHILD_RUNS), "a parent run")[0]
    if len(row_ids(driver)) == 1:
        button.click()
        wait_for(driver, lambda d: len(row_ids(d)) > 1, "the child runs")


def run_names(driver) -> dict[str, str]:
    """run id -> name of the runs table's rows (the name links to the run's page)."""
    return driver.execute_script(
        "const names = {};"
        "for (const a of document.querySelectorAll('.ag-row a[href*=\"/runs/\"]'))"
        "  names[a.getAttribute('href').split('/runs/')[1]] = a.innerText.trim();"
        "return names;")


def search_charts(driver, text: str) -> None:
    """Type into the "Search metric charts" box: only the matching charts stay, at the top of the page."""
    box = wait_for(driver, lambda d: d.find_elements("css selector", "input[role=searchbox]"), "the chart search box")
    box[0].send_keys(text)


def chart(driver, metric: str, points: dict[str, int]):
    """The chart card of `metric`, scrolled into view (plotly draws it only then), once it drew `points`
    (run name -> markers of its line): a chart is drawn first from the runs' latest values, then again
    from the metric's history."""
    from selenium.common.exceptions import TimeoutException

    seen: dict[str, int] = {}

    def drawn(driver):
        card = chart_card(driver, metric)
        seen.clear()
        seen.update(drawn_points(driver, card) if card is not None else {})
        return card if seen == points else None
    try:
        return wait_for(driver, drawn, f"the chart of {metric}")
    except TimeoutException:
        raise AssertionError(f"the chart of {metric} drew {seen} (markers a line), not {points}") from None


def chart_card(driver, metric: str):
    """The card whose title is `metric`, scrolled to the middle of the window; None while there is none."""
    return driver.execute_script(
        "const title = document.querySelector(`${arguments[0]} h4[title='${arguments[1]}']`);"
        "if (!title) return null; const card = title.closest(arguments[0]);"
        "card.scrollIntoView({block: 'center'}); return card;", CHART_CARD, metric)


def drawn_points(driver, card) -> dict[str, int]:
    """run name -> the markers its line has in the card's SVG: plotly draws the traces of its `data` in
    order, each a `.scatterlayer .trace` group with a `.point` path per marker (lines without markers:
    none, and left out here)."""
    return driver.execute_script(
        "const plot = arguments[0].querySelector('.js-plotly-plot');"
        "if (!plot || !plot.data) return {};"
        "const traces = plot.querySelectorAll('.scatterlayer .trace'); const drawn = {};"
        "plot.data.forEach((t, i) => { if ((t.mode || '').includes('markers') && traces[i])"
        "  drawn[t.name] = traces[i].querySelectorAll('.points .point').length; });"
        "return drawn;", card)


def plotted(driver, element) -> list[dict]:
    """The traces in the plotly div inside `element`: what the chart was drawn from."""
    return driver.execute_script(
        "const plot = arguments[0].querySelector('.js-plotly-plot');"
        "return plot && plot.data ? plot.data.map(t => ({name: t.name === undefined ? null : t.name,"
        "  mode: t.mode || null, x: t.x ? Array.from(t.x) : null, y: t.y ? Array.from(t.y) : null,"
        "  dimensions: t.dimensions ? t.dimensions.map(d => [d.label, Array.from(d.values)]) : null})) : null;",
        element)


def shown_image(driver, alt: str):
    """The <img> showing an artifact (alt: its path) once its bytes loaded and decoded (naturalWidth > 0)."""
    def loaded(driver):
        images = driver.execute_script(
            "return Array.from(document.querySelectorAll('img')).filter(i => i.alt === arguments[0]"
            "  && i.complete && i.naturalWidth > 0);", alt)
        return images[0] if images else None
    return wait_for(driver, loaded, f"the image {alt}")
