"""The console in a real headless Chromium (Debian's chromium, driven by Selenium through chromedriver; `make test`
installs both, Makefile SYSTEM_PACKAGES): a check opens a checkpoint, an approver logs in, sees it, approves it with
tokens to add, and a check of the task goes on; a viewer sees it without the buttons. The screenshot of the page is
docs/console.png (set CONSOLE_SCREENSHOT=docs/console.png to write it again)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from budgetwarden_api.v1 import budget_pb2 as pb
from budgetwarden_api.v1 import budget_pb2_grpc

from support import RunningSidecar
from support_admin import TokensFile
from support_console import RunningControlPlane, start_control_plane

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WAIT_S = 60
POLICY = """
unknown_tenants: reject
tenants:
  acme:
    windows:
      hour: {tokens: 40000, usd: 2}
      day: {tokens: 200000, usd: 10}
  globex:
    windows:
      day: {tokens: 100000}
models:
  small: {input_usd_per_mtok: 15, output_usd_per_mtok: 60}
default_task_type: gate
task_types:
  gate:
    per_task: {tokens: 2000}
    checkpoint_threshold: 1.0
  bulk:
    per_task: {tokens: 1000000}
"""


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    assert CHROMIUM, "the browser test needs Debian's chromium and chromium-driver (make test)"
    assert CHROMEDRIVER, "the browser test needs Debian's chromium and chromium-driver (make test)"
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture
def plane_started() -> Iterator[list[RunningControlPlane]]:
    started: list[RunningControlPlane] = []
    yield started
    for plane in started:
        plane.stop()


def check(sidecar: RunningSidecar, task: str, tokens: int, task_type: str = "", step: str = "s1") -> pb.CheckResponse:
    request = pb.CheckRequest(
        tenant_id="acme", task_id=task, step_id=step, task_type=task_type, model="small",
        estimated_input_tokens=tokens, max_output_tokens=tokens // 4,
    )  # fmt: skip
    with grpc.insecure_channel(sidecar.addr) as channel:
        return budget_pb2_grpc.BudgetServiceStub(channel).Check(request, timeout=30)


def log_in(driver: webdriver.Chrome, url: str, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(f"{url}/login")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, WAIT_S).until(expected_conditions.presence_of_element_located((By.ID, "who")))


def checkpoint_row(driver: webdriver.Chrome, checkpoint: str) -> Any:
    selector = f'tr.checkpoint[data-checkpoint="{checkpoint}"]'
    return WebDriverWait(driver, WAIT_S).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, selector))
    )


def test_an_approver_approves_in_the_browser_and_the_task_goes_on(
    tmp_path: Path,
    redis_url: str,
    browser: webdriver.Chrome,
    plane_started: list[RunningControlPlane],
    start_sidecar: Callable[..., RunningSidecar],
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    tokens = TokensFile(tmp_path / "tokens.json")
    alice = tokens.add("alice", "approver", ["acme"])
    vera = tokens.add("vera", "viewer", "*")
    sidecar = start_sidecar(policy_file=policy)
    plane = start_control_plane(redis_url, tokens, policy, sidecar.clock)
    plane_started.append(plane)
    url = plane.console_url

    assert check(sidecar, "nightly-batch", 12000, "bulk").decision == pb.DECISION_ALLOW  # some use in the windows
    assert check(sidecar, "research-agent-7", 800, step="s0").decision == pb.DECISION_ALLOW
    opened = check(sidecar, "research-agent-7", 2400)
    assert opened.decision == pb.DECISION_CHECKPOINT, opened
    checkpoint = opened.checkpoint_id
    assert check(sidecar, "triage-bot-2", 1200, step="s0").decision == pb.DECISION_ALLOW
    waiting = check(sidecar, "triage-bot-2", 1600).checkpoint_id

    log_in(browser, url, alice)
    row = checkpoint_row(browser, checkpoint)
    assert "research-agent-7" in row.text
    amount = row.find_element(By.NAME, "add_tokens")
    amount.clear()
    amount.send_keys("5000")
    row.find_element(By.CSS_SELECTOR, "button.approve").click()
    notice = WebDriverWait(browser, WAIT_S).until(expected_conditions.presence_of_element_located((By.ID, "notice")))
    assert notice.text == f"{checkpoint}: approved"
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr.checkpoint[data-checkpoint="{checkpoint}"]')
    assert "ApproveCheckpoint" in browser.find_element(By.ID, "decisions").text
    assert "alice" in browser.find_element(By.ID, "decisions").text
    checkpoint_row(browser, waiting)
    live = browser.find_element(By.ID, "tasks").text
    assert "nightly-batch" in live
    assert "research-agent-7" in live
    browser.save_screenshot(str(tmp_path / "console.png"))
    if os.environ.get("CONSOLE_SCREENSHOT"):
        shutil.copyfile(tmp_path / "console.png", os.environ["CONSOLE_SCREENSHOT"])

    goes_on = check(sidecar, "research-agent-7", 2400)
    assert goes_on.decision == pb.DECISION_ALLOW, goes_on

    # A viewer sees an open checkpoint, with no button to decide it.
    log_in(browser, url, vera)
    row = checkpoint_row(browser, waiting)
    assert "view only" in row.text
    assert not row.find_elements(By.TAG_NAME, "button")
