"""The whole story in a real browser: load, score, plan, build, recover, compare, chat, plan.json.

Runs the app in a subprocess on a free port and drives Debian's Chromium through PyPI
playwright (never ``playwright install``). Prints the measured timings and saves a screenshot
of every tab into ``test-artifacts/screenshots/``. Skips cleanly without Chromium or playwright.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from app_server import running_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMINGS: dict[str, float] = {}

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (install Debian chromium: make browser)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


@pytest.fixture(scope="module")
def server():
    """The app in a subprocess; always killed at the end (its whole process group)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    with running_app(SHOTS.parent / "app-server.log") as (url, _proc, start):
        TIMINGS["server answering after start (s)"] = time.perf_counter() - start
        yield url, start


def _tab(page, number: int) -> None:
    page.get_by_role("tab", name=re.compile(rf"^{number} ·")).click()


def _shot(page, name: str, plot: str | None = None) -> None:
    if plot:
        page.wait_for_selector(f"{plot} .js-plotly-plot", timeout=60_000)
    page.wait_for_timeout(400)  # let plotly finish its transition
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _wait_text(page, selector: str, pattern: str, timeout_s: float) -> float:
    """Wait until the element's text matches; returns the seconds waited."""
    start = time.perf_counter()
    page.wait_for_function(
        "([sel, pat]) => { const e = document.querySelector(sel); return e && new RegExp(pat).test(e.innerText); }",
        arg=[selector, pattern], timeout=timeout_s * 1000)
    return time.perf_counter() - start


def _pick(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=value, exact=True).click()


def _fill_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_full_story_in_chromium(server, capsys):
    """Every tab from left to right, as a visitor goes: the share error is computed for the plan
    that the block scores proposed (its pruned x kept blocks), before the plan is edited."""
    url, server_start = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            t = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("#load-btn button, button#load-btn", timeout=60_000)
            TIMINGS["page interactive after goto (s)"] = time.perf_counter() - t
            TIMINGS["page interactive after server start (s)"] = time.perf_counter() - server_start

            # 1. model & data
            t = time.perf_counter()
            page.locator("#load-btn").click()
            page.wait_for_selector("#stack-plot .js-plotly-plot", timeout=120_000)
            TIMINGS["load default model (s)"] = time.perf_counter() - t
            assert "30 blocks" in page.locator("#model-summary").inner_text()
            _shot(page, "1-model", "#stack-plot")

            # 2. block scores: cold (fresh analysis cache), then warm from the session
            _tab(page, 2)
            t = time.perf_counter()
            page.locator("#score-btn").click()
            page.wait_for_selector("#scores-plot .js-plotly-plot", timeout=180_000)
            TIMINGS["block scores, first click, cold cache (s)"] = time.perf_counter() - t
            status = page.locator("#score-status").inner_text()
            assert "computed" in status
            assert "Lowest Block Influence" in status
            t = time.perf_counter()
            page.locator("#score-btn").click()
            _wait_text(page, "#score-status", "kept from this visit", 30)
            TIMINGS["block scores, warm click (s)"] = time.perf_counter() - t
            _shot(page, "2-scores", "#angular-plot")
            bar_text = page.locator("#scores-plot").inner_text()
            assert "block id (0-based)" in bar_text

            # 3. the share tab: the exact share error of the proposed plan's pruned x kept blocks, cold
            _tab(page, 3)
            t = time.perf_counter()
            page.locator("#share-btn").click()
            _wait_text(page, "#share-status", r"Share error at ranks \[8\] computed", 120)
            TIMINGS["share error, proposed plan's pairs, rank 8, cold (s)"] = time.perf_counter() - t
            _wait_text(page, "#share-donors", "Suggested donors", 30)
            _shot(page, "3-share", "#share-plot")
            assert "block" in page.locator("#share-plot").inner_text()

            # 4. plan: proposed from the scores at ratio 0.3; one hand edit, timed
            _tab(page, 4)
            _fill_number(page, "ratio", "0.3")
            page.wait_for_selector("#slots-plot .js-plotly-plot", timeout=30_000)
            _wait_text(page, "#plan-message", "FlexiGPT", 30)
            page.get_by_text("plan.json: download, upload, view").click()
            _wait_text(page, "#plan-json", "layer_map", 10)

            def download_plan() -> dict:
                with page.expect_download() as dl:
                    page.locator("#plan-download").click()
                return json.loads(Path(dl.value.path()).read_text())

            plan = download_plan()
            assert plan["method"] == "flexigpt" and len(plan["layer_map"]) == 30
            pruned = [s for s, d in enumerate(plan["layer_map"]) if d != s]
            assert len(pruned) == 9  # round(0.3 * 30)
            _pick(page, "edit-block", str(pruned[0]))
            page.locator("#edit-action").get_by_text("keep", exact=True).click()
            t = time.perf_counter()
            page.locator("#edit-apply").click()
            _wait_text(page, "#plan-message", "8 of 30 blocks pruned", 10)
            TIMINGS["plan edit -> picture + estimate (s)"] = time.perf_counter() - t
            _pick(page, "edit-block", str(pruned[0]))
            page.locator("#edit-action").get_by_text("prune", exact=True).click()
            page.locator("#edit-apply").click()
            _wait_text(page, "#plan-message", "9 of 30 blocks pruned", 10)
            page.wait_for_timeout(300)  # the download button gets the new file with the render
            saved = download_plan()
            assert saved["layer_map"] == plan["layer_map"] and saved["num_blocks"] == 30
            _shot(page, "4-plan", "#slots-plot")

            # 5. build + a short recovery
            _tab(page, 5)
            t = time.perf_counter()
            page.locator("#build-btn").click()
            _wait_text(page, "#build-status", "Built in", 180)
            TIMINGS["build flexigpt + drop with preview perplexity (s)"] = time.perf_counter() - t
            _fill_number(page, "recover-steps", "3")
            _fill_number(page, "recover-batch", "1")
            _pick(page, "recover-seq", "64")
            t = time.perf_counter()
            page.locator("#recover-btn").click()
            _wait_text(page, "#recover-status", r"Recovery (finished|stopped)", 180)
            TIMINGS["recover 3 steps + preview perplexity (s)"] = time.perf_counter() - t
            assert "after 3 steps" in page.locator("#recover-status").inner_text()
            _shot(page, "5-build", "#loss-plot")

            # 6. compare
            _tab(page, 6)
            _wait_text(page, "#compare-table", "flexigpt 30%", 30)
            table = page.locator("#compare-table").inner_text()
            assert "original" in table and "drop 30%" in table and "heldout" in table
            _shot(page, "6-compare", "#compare-plot")

            # 7. chat: the same prompt to both models
            _tab(page, 7)
            page.wait_for_function("() => /flexigpt/.test(document.querySelector('#chat-build input').value)",
                                   timeout=10_000)
            page.locator("#chat-box textarea").fill("What is the capital of France?")
            t = time.perf_counter()
            page.locator("#chat-send").click()
            page.wait_for_function(
                "() => ['#chat-original', '#chat-built'].every(s => { const b = document.querySelectorAll("
                "s + ' .message.bot, ' + s + ' [data-testid=bot]'); return b.length && b[b.length - 1].innerText.trim().length; })",
                timeout=60_000)
            TIMINGS["chat: first tokens of both replies visible (s)"] = time.perf_counter() - t
            _wait_text(page, "#chat-status", "First token after", 120)
            TIMINGS["chat: both replies done (s)"] = time.perf_counter() - t
            status = page.locator("#chat-status").inner_text()
            first = dict(re.findall(r"(original|flexigpt 30% r8): ([0-9.]+ s|n/a \(empty reply\))", status))
            TIMINGS["chat: first token, original (server, s)"] = float(first["original"].split()[0])
            built_first = first.get("flexigpt 30% r8", "")
            if built_first.endswith(" s"):  # 3 recovery steps may leave a build that ends its turn at once
                TIMINGS["chat: first token, built (server, s)"] = float(built_first.split()[0])
            else:
                assert built_first == "n/a (empty reply)" and "no reply" in page.locator("#chat-built").inner_text()
            assert "Paris" in page.locator("#chat-original").inner_text()
            _shot(page, "7-chat")

            # 8. export tab (the zip itself is exercised by the handler tests)
            _tab(page, 8)
            page.wait_for_function("() => /flexigpt/.test(document.querySelector('#export-build input').value)",
                                   timeout=10_000)
            page.locator("#export-plan").click()
            page.wait_for_selector("#export-file a", timeout=10_000)
            with page.expect_download() as dl:
                page.locator("#export-file a").first.click()
            exported = json.loads(Path(dl.value.path()).read_text())
            assert exported["layer_map"] == plan["layer_map"] and exported["method"] == "flexigpt"
            _shot(page, "8-export")

            assert not errors, errors
        except Exception:
            page.screenshot(path=str(SHOTS / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()
            lines = [f"  {k}: {v:.2f}" for k, v in TIMINGS.items()]
            (SHOTS.parent / "browser-timings.json").write_text(json.dumps(TIMINGS, indent=2))
            with capsys.disabled():  # shown in `make test` output, not only on failure
                print("\nbrowser timings:\n" + "\n".join(lines))
