"""``ambient-tracing demo --web``: its JSON API over HTTP, and the page in a real headless Chromium.

The browser test types questions, clicks thumbs up / thumbs down, waits for the page to show each
rating read back from the store, and checks in MLflow itself that each landed on its own trace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from mlflow import MlflowClient

from ambient_tracing.demo import _serve
from ambient_tracing.demo_web import demo_observability, web_app

MLFLOW_UI = "http://127.0.0.1:5000"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
T = TypeVar("T")


@pytest.fixture
def web_demo(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The web demo on a free loopback port, tracing to a fresh sqlite store: (base URL, tracking URI)."""
    observability, tracking_uri = demo_observability(tmp_path / "store" / "mlflow.db")
    with _serve(web_app(observability, tracking_uri, mlflow_ui=MLFLOW_UI)) as base_url:
        yield base_url, tracking_uri


def _until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _run(client: httpx.Client, thread_id: str, question: str, user: str) -> str:
    body = {
        "threadId": thread_id,
        "runId": f"run-{time.monotonic_ns()}",
        "messages": [{"id": "u1", "role": "user", "content": question}],
        "state": {},
        "tools": [],
        "context": [],
        "forwardedProps": {},
    }
    trace_ids = []
    with client.stream("POST", "/agent", json=body, headers={"x-current-user-id": user}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "CUSTOM" and event["name"] == "ambient:trace_id":
                    trace_ids.append(event["value"]["traceId"])
    assert len(trace_ids) == 1
    return trace_ids[0]


def test_the_trace_api_returns_the_stored_span_tree_and_the_rating(web_demo: tuple[str, str]) -> None:
    base_url, _ = web_demo
    with httpx.Client(base_url=base_url, timeout=30) as client:
        assert client.get("/api/traces/not-a-trace").status_code == 400
        unknown = client.get("/api/traces/" + "0" * 32)
        assert (unknown.status_code, unknown.json()["found"]) == (404, False)
        assert "ambient:trace_id" in client.get("/").text

        trace_id = _run(client, "api-thread", "Weather in Lisbon?", user="alice")

        def stored() -> dict[str, Any] | None:
            response = client.get(f"/api/traces/tr-{trace_id}")
            found = response.json() if response.status_code == 200 else None
            return found if found and found["complete"] else None

        trace = _until(stored, 30, "the trace in the store")
        assert (trace["traceId"], trace["state"], trace["thread"]) == (trace_id, "OK", "api-thread")
        [root] = trace["spans"]
        assert root["name"] == "llm_interaction"
        tool = next(span for span in root["children"] if span["name"] == "tool_get_weather")
        assert (tool["inputs"], tool["outputs"]) == ('{"city": "lisbon"}', '"21°C and sunny"')
        assert trace["ratings"] == []
        assert trace["mlflowUrl"].startswith(f"{MLFLOW_UI}/#/experiments/")
        assert trace["mlflowUrl"].endswith(f"/traces?selectedEvaluationId=tr-{trace_id}")

        feedback = {"type": "META", "metaType": "thumbs_down", "threadId": "api-thread"}
        anonymous = client.post("/feedback", json={**feedback, "payload": {"traceId": trace_id}})
        assert anonymous.status_code == 401  # the demo's /feedback takes the rater from the user header
        answer = client.post(
            "/feedback",
            json={**feedback, "payload": {"traceId": trace_id, "comment": "too cold"}},
            headers={"x-current-user-id": "bob"},
        )
        assert answer.json()["event"]["recorded"] is True

        rated = _until(lambda: (found := stored()) and found["ratings"] and found, 30, "the rating")
        assert rated["ratings"] == [
            {
                "name": "user-feedback",
                "value": False,
                "user": "bob",
                "sourceType": "HUMAN",
                "rationale": "too cold",
            }
        ]


def test_the_cli_serves_the_page_until_interrupted(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "ambient_tracing.cli", "demo", "--web", "--port", str(port)]
    command += ["--store", str(tmp_path / "mlflow.db"), "--mlflow-ui", MLFLOW_UI]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        def page() -> str | None:
            assert process.poll() is None, "the demo exited"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text
            except httpx.TransportError:
                return None

        assert "<title>ambient-tracing demo" in _until(page, 90, "the page")
        process.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, the lifespan closes the backends
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode in (0, -signal.SIGINT, 128 + signal.SIGINT), output
    assert f"Open http://127.0.0.1:{port}/" in output
    assert f"Trace links open the MLflow UI at {MLFLOW_UI}" in output


# -- the page in a real browser ----------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1100,1500",
)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium + chromium-driver are not installed (`make test` installs them with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download or report anything
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _ask(driver: Any, question: str, number: int) -> Any:
    """Send ``question``; the ``number``-th turn once its answer and its stored trace are shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.ID, "question")
    box.send_keys(question)
    driver.find_element(By.ID, "send").click()
    wait = WebDriverWait(driver, 60, poll_frequency=0.2)
    turn = wait.until(
        lambda d: (
            (turns := d.find_elements(By.CSS_SELECTOR, "section.turn"))
            and len(turns) >= number
            and turns[number - 1].get_attribute("data-stored") == "yes"
            and turns[number - 1]
        )
    )
    return turn


def _rate(driver: Any, turn: Any, button: str, kind: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    turn.find_element(By.CSS_SELECTOR, f"button.{button}").click()
    WebDriverWait(driver, 60, poll_frequency=0.2).until(lambda d: turn.get_attribute("data-rating") == kind)


def _feedback(client: MlflowClient, trace_id: str) -> list[Any]:
    info = client.get_trace(f"tr-{trace_id}").info
    return [a for a in info.assessments if a.name == "user-feedback" and a.valid is not False]


def test_a_click_in_the_browser_lands_on_the_trace_the_page_shows(
    web_demo: tuple[str, str], browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    base_url, tracking_uri = web_demo
    started = time.monotonic()
    browser.get(base_url + "/")

    first = _ask(browser, "What's the weather in Lisbon?", 1)
    assert first.find_element(By.CSS_SELECTOR, ".answer").text == "It is 21°C and sunny in Lisbon."
    assert "get_weather" in first.find_element(By.CSS_SELECTOR, ".tool").text
    first_id = first.get_attribute("data-trace-id")
    assert first.find_element(By.CSS_SELECTOR, ".trace-id").text == f"trace tr-{first_id}"
    shown = [span.text for span in first.find_elements(By.CSS_SELECTOR, ".span-name")]
    assert shown[0] == "llm_interaction" and "tool_get_weather" in shown
    link = first.find_element(By.CSS_SELECTOR, "a.mlflow-link").get_attribute("href")
    assert link.startswith(MLFLOW_UI) and link.endswith(f"selectedEvaluationId=tr-{first_id}")
    _rate(browser, first, "thumbs-up", "thumbs_up")
    assert "landed in MLflow" in first.find_element(By.CSS_SELECTOR, ".rating").text

    second = _ask(browser, "And in Oslo?", 2)
    second_id = second.get_attribute("data-trace-id")
    assert second.find_element(By.CSS_SELECTOR, ".answer").text == "It is 4°C and light rain in Oslo."
    assert "tool_get_weather" in [s.text for s in second.find_elements(By.CSS_SELECTOR, ".span-name")]
    _rate(browser, second, "thumbs-down", "thumbs_down")
    browser.set_window_size(1100, 1010)  # both turns, no empty space below
    browser.save_screenshot(str(tmp_path / "demo-web.png"))
    if os.environ.get("AMBIENT_DEMO_SCREENSHOT"):  # how docs/img/demo-web.png is made
        browser.save_screenshot(os.environ["AMBIENT_DEMO_SCREENSHOT"])

    third = _ask(browser, "Thanks! Which one is warmer?", 3)
    third_id = third.get_attribute("data-trace-id")
    assert "tool_get_weather" not in [s.text for s in third.find_elements(By.CSS_SELECTOR, ".span-name")]
    third.find_element(By.CSS_SELECTOR, "button.correction").click()
    third.find_element(By.CSS_SELECTOR, "input.correction-text").send_keys("Lisbon, by 17°C.")
    _rate(browser, third, "send-correction", "correction")

    # Independently of the page: each rating is on exactly the trace whose id the page showed.
    client = MlflowClient(tracking_uri=tracking_uri)
    [correction] = [a for a in client.get_trace(f"tr-{third_id}").info.assessments if a.valid is not False]
    assert (correction.name, correction.value) == ("user-correction", "Lisbon, by 17°C.")
    assert len({first_id, second_id, third_id}) == 3
    [up] = _feedback(client, first_id)
    [down] = _feedback(client, second_id)
    assert (up.value, up.source.source_type, up.source.source_id) == (True, "HUMAN", "demo-user")
    assert (down.value, down.source.source_type, down.source.source_id) == (False, "HUMAN", "demo-user")
    for trace_id in (first_id, second_id):
        trace = client.get_trace(f"tr-{trace_id}")
        assert trace.info.tags["ambient.thread_id"].startswith("web-thread-")
        assert {"llm_interaction", "tool_get_weather"} <= {span.name for span in trace.data.spans}
    assert time.monotonic() - started < 150
