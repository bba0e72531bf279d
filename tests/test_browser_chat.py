"""The Chat and Evaluate tabs, and feedback, used in a real browser as a person would (Playwright,
system Chromium), on the fake model: what is asserted is the conversation, the buttons, the stored
feedback and the measurements shown, not the quality of the text. Screenshots go to
``test-output/screenshots/`` (chat.png, generate_feedback.png, evaluate.png).
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import launch_app
from slm_app.backends.fake import SCRIPT
from slm_app.feedback import store_for
from slm_app.settings import Settings
from test_browser import (CHROMIUM, CHROMIUM_ARGS, LONG, SHORT, block, json_text, open_tab, run_finished, screenshot,
                          watch_run)

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-chat")
    with launch_app(Settings(tier="free", backend="fake", cache_dir=str(root / "cache"), data_dir=str(root / "data"),
                             fake_step_ms=5)) as running:
        yield running


@pytest.fixture(scope="module")
def store(server):
    return store_for(server.service.settings)


@pytest.fixture(scope="module")
def page(server):
    with playwright_sync.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(SHORT)
        expect.set_options(timeout=SHORT)
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(server.url, wait_until="domcontentloaded")
        expect(pg.locator("p").filter(has_text="Tier:").first).to_contain_text("status: ok", timeout=LONG)
        pg.page_errors = errors  # type: ignore[attr-defined]
        yield pg
        context.close()
        browser.close()
        expect.set_options(timeout=5_000)


@pytest.fixture(scope="module")
def screenshots():
    from test_browser import SCREENSHOTS

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


def send(tab, text: str) -> None:
    box = tab.locator("#chat-message textarea")
    box.fill(text)
    box.press("Enter")


def test_tabs_include_chat_and_evaluate(page) -> None:
    expect(page.get_by_role("tab")).to_have_text(
        ["Generate", "Chat", "Batch", "Structured JSON", "Evaluate", "Fine-tune", "Health & Memory"])


def test_chat_two_turns_then_like_with_rating_and_correction(page, store, screenshots) -> None:
    tab = open_tab(page, "Chat")
    expect(tab.get_by_text("Nothing you type is stored").first).to_be_visible()
    tab.get_by_text("System prompt and sampling").click()
    tab.get_by_label("System prompt (optional)").fill("Answer briefly.")
    tab.get_by_label("Max new tokens (1–32)").fill("16")
    tab.get_by_label("Temperature (0.0–2.0, 0 = greedy)").fill("0")

    bots, users = tab.get_by_test_id("bot"), tab.get_by_test_id("user")
    send(tab, "Hello there")
    expect(bots).to_have_count(1, timeout=LONG)
    expect(bots.first).to_contain_text(SCRIPT[:20], timeout=LONG)
    send(tab, "Tell me more")
    expect(users).to_have_count(2)
    expect(bots).to_have_count(2, timeout=LONG)
    expect(tab.locator("#chat-message textarea")).to_be_editable(timeout=LONG)  # the answer is complete
    first, second = (bots.nth(i).inner_text().strip() for i in range(2))

    tab.get_by_role("button", name="Like", exact=True).last.click()
    status = tab.locator("p").filter(has_text="saved as feedback #")
    expect(status).to_be_visible()
    expect(tab.get_by_label("Answer rated")).to_have_value(second)
    expect(tab.get_by_role("radio", name="5")).to_be_checked()
    feedback_id = int(re.search(r"#(\d+)", status.inner_text()).group(1))
    row = store.get(feedback_id)
    assert (row["source"], row["rating"], row["output"]) == ("chat", 5, second)
    assert row["messages"] == [{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": "Hello there"},
                               {"role": "assistant", "content": first},
                               {"role": "user", "content": "Tell me more"}]
    assert row["sampling"]["max_new_tokens"] == 16 and row["sampling"]["temperature"] == 0

    tab.get_by_role("radio", name="4").check()
    tab.get_by_label("Corrected answer (optional)").fill("A better answer.")
    tab.get_by_role("button", name="Update feedback").click()
    expect(tab.locator("p").filter(has_text=f"Feedback #{feedback_id} updated: rating 4 with your correction")
           ).to_be_visible()
    row = store.get(feedback_id)
    assert (row["rating"], row["correction"]) == (4, "A better answer.")
    screenshot(page, screenshots, "chat")

    # A thumb down on the first answer is a second piece of feedback, rated 1.
    tab.get_by_role("button", name="Dislike", exact=True).first.click()
    expect(tab.locator("p").filter(has_text=f"saved as feedback #{feedback_id + 1} (rating 1)")).to_be_visible()
    assert store.get(feedback_id + 1)["output"] == first


def test_update_without_a_thumb_says_what_to_do(page, store) -> None:
    page.reload(wait_until="domcontentloaded")  # a fresh session: no thumb clicked yet
    expect(page.locator("p").filter(has_text="Tier:").first).to_contain_text("status: ok", timeout=LONG)
    tab = open_tab(page, "Chat")
    before = len(store.all())
    tab.get_by_role("button", name="Update feedback").click()
    toast = page.get_by_test_id("toast-body").filter(has_text="click 👍 or 👎 on an answer first")
    expect(toast).to_be_visible()
    toast.get_by_role("button", name="Close", exact=True).click()
    assert len(store.all()) == before


def test_generate_output_thumbs_up(page, store, screenshots) -> None:
    tab = open_tab(page, "Generate")
    tab.get_by_label("Prompt", exact=True).fill("Once upon a time")
    tab.get_by_label("Max new tokens (1–32)").fill("8")
    watch_run(block(tab, "Generated text"))
    tab.get_by_role("button", name="Generate", exact=True).click()
    assert not run_finished(page)["error"]
    text = tab.get_by_label("Generated text").input_value()
    assert text
    tab.get_by_role("button", name="👍 Good output").click()
    status = tab.locator("p").filter(has_text="saved as feedback #")
    expect(status).to_be_visible()
    row = store.get(int(re.search(r"#(\d+)", status.inner_text()).group(1)))
    assert (row["source"], row["prompt"], row["output"], row["rating"]) == ("generate", "Once upon a time", text, 5)
    assert row["sampling"]["max_new_tokens"] == 8 and "top_k" in row["sampling"]
    screenshot(page, screenshots, "generate_feedback")


def test_health_shows_feedback_counts(page, store) -> None:
    tab = open_tab(page, "Health & Memory")
    tab.get_by_role("button", name="Refresh").click()
    counts = block(tab, "Feedback (counts by rating)")
    expect(counts.locator(".json-holder")).to_contain_text(f'"total": {store.counts()["total"]}')
    assert '"5": 1' in json_text(counts) and '"1": 1' in json_text(counts) and '"4": 1' in json_text(counts)


def test_evaluate_perplexity_then_checks(page, screenshots) -> None:
    tab = open_tab(page, "Evaluate")
    tab.get_by_label("Text to score").fill("\n" + SCRIPT.strip())
    tab.get_by_role("button", name="Compute perplexity").click()
    summary = tab.locator("p").filter(has_text="PPL =")
    expect(summary).to_be_visible(timeout=LONG)
    assert re.search(r"PPL = [0-9.]+ ± [0-9.]+ · \d+ of \d+ tokens scored in 1 chunk\(s\) · method sliding",
                     summary.inner_text()), summary.inner_text()
    expect(block(tab, "Per-chunk perplexity").locator("svg, canvas").first).to_be_visible()
    expect(block(tab, "Perplexity").locator(".json-holder")).to_contain_text('"tokens_scored"')

    # The shipped behavioural checks: the fake model's script fails most of them, passes none by luck.
    tab.get_by_role("button", name="Run evaluation").click()
    expect(tab.get_by_text("FAIL", exact=True).filter(visible=True).first).to_be_visible(timeout=LONG)  # the table
    expect(block(tab, "Evaluation summary").locator(".json-holder")).to_contain_text('"done": true', timeout=LONG)
    assert '"kind": "checks"' in json_text(block(tab, "Evaluation summary"))
    screenshot(page, screenshots, "evaluate")


def test_evaluate_stop_button_cancels_a_long_run(page) -> None:
    tab = open_tab(page, "Evaluate")
    many = "\n".join(json.dumps({"prompt": f"item {i}", "expect": {"contains": "Hello"}}) for i in range(300))
    tab.get_by_label("JSONL data (one item per line)").fill(many)
    tab.get_by_label("Max new tokens per answer (1–32)").fill("32")
    tab.get_by_role("button", name="Run evaluation").click()
    summary = block(tab, "Evaluation summary").locator(".json-holder")
    expect(summary).to_contain_text('"done": false', timeout=LONG)
    tab.get_by_role("button", name="Stop evaluation").click()
    page.wait_for_timeout(1500)
    stopped_at = json_text(block(tab, "Evaluation summary"))
    page.wait_for_timeout(1500)
    assert json_text(block(tab, "Evaluation summary")) == stopped_at, "the evaluation went on after Stop"
    assert '"done": false' in stopped_at and '"total": 300' in stopped_at


# Gradio 6.17.3's Chatbot sometimes reads `.flatMap` of a value it has not received yet when its tab
# is first shown on a slow machine (seen in full-suite runs only; the chat itself works, as the tests
# above show). It is Gradio's own frontend, not ours: tolerated here, and any other error fails.
KNOWN_GRADIO_ERRORS = ("Cannot read properties of undefined (reading 'flatMap')",)


def test_no_javascript_errors(page) -> None:
    ours = [e for e in page.page_errors if e not in KNOWN_GRADIO_ERRORS]
    assert not ours, ours
