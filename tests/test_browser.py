"""A real user's session in a real browser: the free tier launched on a free port, driven with
Playwright through the system Chromium (no downloaded browser: the network is closed).

The free tier runs tiny-gpt2 with random weights, so the text is gibberish: the tests assert on
presence, shape and progress, never on content. Tests share one page and run in file order, like a
user going from tab to tab; each one still opens its own tab and sets its own inputs.
A full-page screenshot per tab goes to ``test-output/screenshots/<tab>.png`` (gitignored).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from slm_app.presets import PRESETS

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium's own connections are refused by a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SHORT = 15_000   # ms: UI reactions (tab switch, toast, queue=False events)
LONG = 60_000    # ms: anything that runs the model

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
]


# ---- fixtures: one server, one browser, one page per module --------------------------------------
@pytest.fixture(scope="module")
def server(free_app):
    return free_app


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(SHORT)
    expect.set_options(timeout=SHORT)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(server.url, wait_until="domcontentloaded")
    # The banner is filled by demo.load: once it names the tier, the app is up and wired.
    expect(banner(pg)).to_contain_text("Tier:", timeout=LONG)
    pg.page_errors = errors  # type: ignore[attr-defined]
    yield pg
    context.close()
    expect.set_options(timeout=5_000)  # Playwright's default, for any later module


@pytest.fixture(scope="module")
def screenshots():
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


# ---- helpers --------------------------------------------------------------------------------------
def banner(page):
    return page.locator("p").filter(has_text="Tier:").first


def open_tab(page, name: str):
    """Select a tab; returns its panel (the one visible tabpanel), to which locators are scoped since
    tabs repeat labels ("Prompt", "Max new tokens ...") and visited tabs stay in the DOM, hidden."""
    tab = page.get_by_role("tab", name=name, exact=True)
    tab.click()
    expect(tab).to_have_attribute("aria-selected", "true")
    panel = page.get_by_role("tabpanel")
    expect(panel).to_have_count(1)
    return panel


def block(scope, label: str):
    """The Gradio block (component container) whose label is exactly ``label``: JSON, plot, ..."""
    root = getattr(scope, "page", scope)  # a filter's inner locator must start from the page
    label_loc = root.get_by_test_id("block-label").or_(root.get_by_test_id("block-info"))
    # Innermost match: a container that holds the block would come first in document order.
    return scope.locator(".block").filter(has=label_loc.get_by_text(label, exact=True)).last


def json_text(json_block) -> str:
    """A gr.JSON block's rendered text with whitespace tidied: ``{"tier": "free", ...}``."""
    text = json_block.locator(".json-holder").text_content() or ""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,:\]}])", r"\1", re.sub(r"([\[{])\s+", r"\1", text))


def watch_run(component_block) -> None:
    """Watch one run of the event that writes into ``component_block`` (a ``block(...)`` locator).
    The run starts when the block's status tracker turns busy (pending / generating) and is over when
    it hides again (``error`` false) or shows Gradio's error badge (``error`` true). For a textbox,
    two records of its value during the run:
    * ``painted``: its value whenever it changed, sampled every 10 ms (roughly what a user sees);
    * ``assigned``: every value the app wrote into it (a hook on the element's ``value`` setter), which
      still shows the steps when the browser, short of CPU, handles several updates between two samples.
    Call before the click that starts the run; ``run_finished`` waits for the end and returns the record."""
    component_block.evaluate(
        """(blk) => {
            if (window.__run) { clearInterval(window.__run.timer); window.__run.observer.disconnect(); }
            const tracker = blk.querySelector(':scope > [data-testid="status-tracker"]')
                || blk.querySelector('[data-testid="status-tracker"]');
            const el = blk.querySelector('textarea');
            const state = () => tracker.classList.contains('hide') ? 'idle'
                : (tracker.querySelector('.error') || /\\bError\\b/.test(tracker.textContent)) ? 'error' : 'busy';
            const run = window.__run = {painted: [], painted_at: [], assigned: [], assigned_at: [],
                                        started: false, done: false, error: false, ended_at: null,
                                        t0: performance.now()};
            const now = () => Math.round(performance.now() - run.t0);
            if (el && !el.__hooked) {
                const proto = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value');
                Object.defineProperty(el, 'value', {
                    configurable: true,
                    get() { return proto.get.call(this); },
                    set(v) {
                        const r = window.__run;
                        if (r && !r.done && v !== proto.get.call(this)) {
                            r.assigned.push(v); r.assigned_at.push(now());
                        }
                        proto.set.call(this, v);
                    },
                });
                el.__hooked = true;
            }
            let last = el ? el.value : null;
            const tick = () => {
                if (run.done) return;
                if (el && el.value !== last) { last = el.value; run.painted.push(last); run.painted_at.push(now()); }
                const s = state();
                if (s === 'busy') run.started = true;
                else if (run.started) {
                    run.done = true; run.error = s === 'error'; run.ended_at = now();
                    clearInterval(run.timer); run.observer.disconnect();
                }
            };
            run.timer = setInterval(tick, 10);
            // A tracker change is seen at once, so even a run shorter than one tick is caught.
            run.observer = new MutationObserver(tick);
            run.observer.observe(tracker, {attributes: true, childList: true, subtree: true, characterData: true});
        }"""
    )


def run_finished(page) -> dict:
    """Wait for the run watched by ``watch_run`` to end; returns its record."""
    page.wait_for_function("() => window.__run && window.__run.done", timeout=LONG)
    return page.evaluate("() => window.__run")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # IHDR comes first
    assert width >= 800 and height >= 600 and len(data) > 10_000, (path, width, height, len(data))


def screenshot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert_png(path)
    return path


# ---- the session ----------------------------------------------------------------------------------
def test_banner_shows_free_tier_and_random_weights_warning(page) -> None:
    expect(banner(page)).to_contain_text("free")
    expect(banner(page)).to_contain_text("SLM_TIER=free")
    expect(banner(page)).to_contain_text("status: ok")
    warning = page.locator("p").filter(has_text="random weights")
    expect(warning).to_be_visible()
    expect(warning).to_contain_text("meaningless")
    expect(page.get_by_role("tab")).to_have_text(
        ["Generate", "Chat", "Batch", "Structured JSON", "Evaluate", "Fine-tune", "Health & Memory"])


def test_generate_streams_text_into_the_output(page, screenshots) -> None:
    tab = open_tab(page, "Generate")
    tab.get_by_label("Prompt", exact=True).fill("Once upon a time in a small village")
    tab.get_by_label("Max new tokens (1–32)").fill("32")  # the free tier's cap: the longest stream
    tab.get_by_label("Seed (-1 = random)").fill("7")
    output = tab.get_by_label("Generated text")
    watch_run(block(tab, "Generated text"))
    tab.get_by_role("button", name="Generate", exact=True).click()
    run = run_finished(page)

    final = output.input_value()
    assert not run["error"], "the generation ended in an error"
    assert final.strip(), "no text appeared in 'Generated text'"
    painted = [v for v in run["painted"] if v]
    assigned = [v for v in run["assigned"] if v]
    print(f"\nstreaming: 'Generated text' took {len(assigned)} distinct values (written at ms {run['assigned_at']}), "
          f"{len(painted)} of them seen by 10 ms sampling (at ms {run['painted_at']}); "
          f"run over at {run['ended_at']} ms")
    assert painted and painted[-1] == final and assigned[-1] == final
    # Streamed: the box held partial texts before the full one, each extending the previous.
    for values in (painted, assigned):
        assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(values, values[1:])), values
    assert len(assigned) > 1, f"the output was written once ({assigned!r}): no streaming observed"
    screenshot(page, screenshots, "generate")


def test_generate_empty_prompt_shows_error_and_app_keeps_working(page) -> None:
    tab = open_tab(page, "Generate")
    prompt = tab.get_by_label("Prompt", exact=True)
    output_block = block(tab, "Generated text")
    prompt.fill("")
    watch_run(output_block)
    tab.get_by_role("button", name="Generate", exact=True).click()
    toast = page.get_by_test_id("toast-body").filter(has_text="prompt is empty")
    expect(toast).to_be_visible()
    expect(toast).to_contain_text("Error")
    assert run_finished(page)["error"], "the output box does not show the error"
    toast.get_by_role("button", name="Close", exact=True).click()
    expect(toast).to_have_count(0)

    # The app keeps serving: a new prompt generates again, and the error badge goes away.
    prompt.fill("A second try")
    tab.get_by_label("Max new tokens (1–32)").fill("8")
    tab.get_by_label("Seed (-1 = random)").fill("-1")
    watch_run(output_block)
    tab.get_by_role("button", name="Generate", exact=True).click()
    run = run_finished(page)
    assert not run["error"] and run["assigned"], run
    expect(tab.get_by_label("Generated text")).to_have_value(run["assigned"][-1])
    expect(output_block.get_by_text("Error", exact=True)).to_have_count(0)
    expect(page.get_by_test_id("toast-body")).to_have_count(0)


def test_batch_returns_one_result(page, screenshots) -> None:
    tab = open_tab(page, "Batch")
    tab.get_by_label("Prompts, one per line (at most 1)").fill("The weather today is")
    tab.get_by_label("Max new tokens (1–32)").fill("8")
    results = block(tab, "Results")
    watch_run(results)
    tab.get_by_role("button", name="Run batch").click()
    assert not run_finished(page)["error"]
    expect(results.locator(".json-holder")).to_contain_text('"results"')
    # The tree: {"results": [<one string>]} -- one key at depth 1, one item at depth 2.
    depth1 = results.locator('.json-node[style*="--depth: 1"]')
    expect(depth1).to_have_count(1)
    expect(depth1.locator(".key").first).to_have_text('"results"')
    items = results.locator('.json-node[style*="--depth: 2"]')
    expect(items).to_have_count(1)
    expect(items.locator(".value.string")).to_have_count(1)
    screenshot(page, screenshots, "batch")


def structured_status(tab):
    return tab.locator("p").filter(has_text=re.compile(r"Validated against the schema|Not valid"))


def test_structured_preset_then_validated_json(page, screenshots) -> None:
    tab = open_tab(page, "Structured JSON")
    # The schema's editor, not the Result box (a read-only code box too).
    editor = block(tab, "JSON Schema").get_by_role("textbox", name="Code input container")
    dropdown = tab.get_by_label("Preset schema")
    current = dropdown.input_value()
    assert json.loads(editor.inner_text()) == PRESETS[current]
    before = editor.text_content()
    dropdown.click()
    expect(page.get_by_role("option").first).to_be_visible()
    chosen = next(name for name in PRESETS if name != current)
    page.get_by_role("option", name=chosen, exact=True).click()
    expect(dropdown).to_have_value(chosen)
    expect(editor).not_to_have_text(before)  # the preset's schema replaced the editor's content
    assert json.loads(editor.inner_text()) == PRESETS[chosen]

    result = block(tab, "Result")
    watch_run(result)
    tab.get_by_role("button", name="Generate JSON").click()
    assert not run_finished(page)["error"], "the structured request was refused"
    status = structured_status(tab)
    expect(status).to_be_visible()
    # The result is JSON text in a code box (json_output: no value is ever read as a file).
    expect(result.locator(".cm-content")).to_contain_text('"success"')
    screenshot(page, screenshots, "structured_json")
    out = json.loads(result.locator(".cm-content").inner_text())
    assert out["success"] is True, f"structured generation failed: {status.inner_text()!r} / {out!r}"
    assert out["error"] is None and json.loads(out["raw_text"]) == out["data"], out
    expect(status).to_contain_text("Validated against the schema")

    raw = tab.get_by_label("Raw model output")
    expect(raw).not_to_have_value("", timeout=2_000)
    json.loads(raw.input_value())  # it validated, so it parses


def test_structured_bad_schema_shows_error(page) -> None:
    tab = open_tab(page, "Structured JSON")
    editor = block(tab, "JSON Schema").get_by_role("textbox", name="Code input container")
    editor.fill('{"type": "nonsense"}')
    assert json.loads(editor.inner_text()) == {"type": "nonsense"}
    result = block(tab, "Result")
    watch_run(result)
    tab.get_by_role("button", name="Generate JSON").click()
    toast = page.get_by_test_id("toast-body").filter(has_text="schema:")
    expect(toast).to_be_visible()
    assert run_finished(page)["error"], "the Result box does not show the error"
    toast.get_by_role("button", name="Close", exact=True).click()
    expect(toast).to_have_count(0)
    # The status line must not still vouch for an earlier run's output.
    expect(tab.locator("p").filter(has_text="Validated against the schema")).to_have_count(0, timeout=2_000)
    expect(tab.locator("p").filter(has_text="Request refused")).to_have_count(1)


def test_health_dashboard_shows_figures_at_a_glance(page, screenshots) -> None:
    tab = open_tab(page, "Health & Memory")
    figures = tab.locator("table").filter(has_text="Memory (RSS)")
    expect(figures).to_be_visible()
    for heading in ("Guard limit", "Tokens/s", "Slots busy", "Queue", "p50 latency", "p95 latency", "GC runs"):
        expect(figures.locator("th", has_text=heading)).to_have_count(1)
    cells = figures.locator("td").all_inner_texts()
    assert re.fullmatch(r"[0-9,]+ MB of [0-9,]+ MB \([0-9.]+%\)", cells[0]), cells
    assert re.fullmatch(r"\d+ / \d+", cells[3]) and re.fullmatch(r"[0-9,]+", cells[7]), cells
    summary = tab.locator("p").filter(has_text="backend:")
    expect(summary).to_contain_text("ready")
    expect(summary).to_contain_text("licence:")
    expect(summary).to_contain_text("adapter:")
    plot = block(tab, "Memory")
    expect(plot.locator("svg, canvas").first).to_be_visible()
    expect(plot).to_contain_text("RSS")
    screenshot(page, screenshots, "health_dashboard")


def test_health_refresh_gc_and_memory_plot(page, screenshots) -> None:
    tab = open_tab(page, "Health & Memory")
    tab.get_by_text("Raw JSON", exact=False).first.click()  # the raw reading is folded under the dashboard
    health = block(tab, "Health")
    expect(health.locator(".json-holder")).to_contain_text('"uptime_s"')
    uptime = re.search(r'"uptime_s": ([0-9.]+)', json_text(health)).group(0)
    tab.get_by_role("button", name="Refresh").click()
    # A refresh is a new reading: wait until the uptime is not the page-load one any more.
    expect(health.locator(".json-holder")).not_to_contain_text(uptime)
    text = json_text(health)
    assert '"tier": "free"' in text and '"model_loaded": true' in text, text
    assert '"status": "ok"' in text, text

    tab.get_by_role("button", name="Run garbage collection").click()
    gc_block = block(tab, "Garbage collection (RSS before/after, MB)")
    expect(gc_block.locator(".json-holder")).to_contain_text('"rss_before_mb"')
    assert re.search(r'"rss_before_mb": [0-9.]+, "rss_after_mb": [0-9.]+', json_text(gc_block)), json_text(gc_block)

    plot = block(tab, "Memory")
    expect(plot.locator("svg, canvas").first).to_be_visible()
    expect(plot).to_contain_text("RSS")
    screenshot(page, screenshots, "health_memory")


def test_no_javascript_errors(page) -> None:
    assert not page.page_errors, page.page_errors
