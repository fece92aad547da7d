"""The admin page as a person uses it, in headless Chromium (Debian's /usr/bin/chromium driven
by Playwright; no browser is downloaded): log in, edit a rule and see the validation error,
dry-run, save, push a study with storescu and watch it reach 'done' on the dashboard, resend
a delivery. Screenshots of the main pages go to $DICOM_AI_NODE_SCREENSHOTS when set
(docs/screenshots is made that way), else to the test's temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.node_process import NODE_AE, NodeProcess
from tests.peers import skip_unless_tools, storescu, storescu_failures
from tests.synthetic import make_ct_series
from tests.test_end_to_end import RULES  # the same lung rule as the end-to-end tests

CHROMIUM = "/usr/bin/chromium"
WEIGHTS = Path(__file__).resolve().parent.parent / "model_zoo" / "lung_ct_seg" / "weights.pt"
playwright = pytest.importorskip("playwright.sync_api")

pytestmark = [pytest.mark.integration, skip_unless_tools("storescu", "/usr/sbin/Orthanc", CHROMIUM),
              pytest.mark.skipif(not WEIGHTS.is_file(), reason="lung model weights not trained yet")]

PASSWORD = "browser-test-password"
# the flags Debian's chromium needs as root in a container, and nothing that phones home
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    with playwright.sync_playwright() as driver:
        # Playwright launches headless with a fresh --user-data-dir of its own
        chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def reload_until(page, predicate, timeout: float, what: str, node: NodeProcess):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f}s for {what}; the page says:\n{page.inner_text('main')}"
                               f"\n---- node log:\n{node.log()[-4000:]}")
        time.sleep(1.0)
        page.reload()


def test_admin_edits_rules_and_watches_a_study_through(tmp_path, orthanc, browser):
    shots = Path(os.environ.get("DICOM_AI_NODE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    series = make_ct_series(tmp_path / "ct", shape=(40, 96, 96), spacing=(2.5, 3.5, 3.5),
                            patient_name="<script>alert(1)</script>^Phantom")
    node = NodeProcess(tmp_path / "node", port=orthanc.node_port, destination_port=orthanc.dicom_port,
                       rules=RULES, web=True)
    with node:
        subprocess.run([sys.executable, "-m", "dicom_ai_node.cli", "--config", str(node.config_path), "users",
                        "add", "admin", "--role", "admin", "--password-stdin"], input=PASSWORD + "\n",
                       text=True, check=True, capture_output=True, timeout=60)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("dialog", lambda dialog: pytest.fail(f"a page opened a dialog: {dialog.message}"))
        base = node.web_url

        page.goto(f"{base}/")  # not logged in: the login page
        page.fill("input[name=name]", "admin")
        page.fill("input[name=password]", PASSWORD)
        page.click("button:has-text('Log in')")
        page.wait_for_selector("h1:has-text('Dashboard')")

        # a rule naming a model the node lacks is refused with the exact place
        page.click("nav >> text=Rules")
        page.fill("#rules-text", RULES.replace('models = ["lung_ct_seg"]', 'models = ["lung_ct_seg", "brain_mr"]'))
        page.click("button:has-text('Save as new version')")
        problems = page.inner_text("#rules-problems")
        assert "rules[0] (chest-ct-lungs).models[1]: unknown model 'brain_mr'" in problems
        assert "nothing was saved" in problems

        # fix it, dry-run, save with a comment
        page.fill("#rules-text", RULES.replace("priority = 10", "priority = 20"))
        page.click("button:has-text('Dry-run')")
        assert "0 stored studies" in page.inner_text("#dry-run")
        page.fill("input[name=comment]", "raise priority")
        page.click("button:has-text('Save as new version')")
        assert "saved as version 2" in page.inner_text(".flash.ok")
        assert "raise priority" in page.inner_text("aside")
        page.screenshot(path=str(shots / "rules.png"), full_page=True)

        # a scanner sends a study; the dashboard shows it done
        assert not storescu_failures(storescu("127.0.0.1", node.port, tmp_path / "ct", NODE_AE))
        page.goto(f"{base}/")
        reload_until(page, lambda: "1 done" in page.inner_text("section:has(h2:has-text('Recent studies'))"),
                     timeout=180, what="the study's job to be done on the dashboard", node=node)
        page.screenshot(path=str(shots / "dashboard.png"), full_page=True)

        # the study page: what arrived, why the rule matched, the job, its results; resend one
        page.click(f"a:has-text('{series.study_instance_uid}')")
        assert "<script>alert(1)</script>" in page.inner_text("#patient-name")  # shown as text, not run
        assert "chest-ct-lungs: MATCHED" in page.inner_text("details.decision.matched summary").replace("\n", " ")
        page.screenshot(path=str(shots / "study.png"), full_page=True)
        page.click("button:has-text('Resend') >> nth=0")
        assert "queued again" in page.inner_text(".flash.ok")
        reload_until(page, lambda: "pending" not in page.inner_text("section:has(h2:has-text('Jobs'))"),
                     timeout=60, what="the resent delivery to be sent", node=node)
        assert "2 attempt" not in page.inner_text("section:has(h2:has-text('Jobs'))")  # sent at the first try

        for name in ("destinations", "models", "audit"):
            page.goto(f"{base}/{name}")
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        audit = page.inner_text("table")
        assert "rules.save" in audit and "deliveries.resend" in audit and "admin" in audit
