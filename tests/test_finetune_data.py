"""Fine-tuning data preparation: the CLI on a real feedback store and on user files, and properties of
the cleaning and splitting (hypothesis) that must hold for any input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from slm_app.feedback import FeedbackStore, FILE_NAME
from slm_app.finetune import data
from slm_app.errors import RequestError

pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str, env_data_dir: Path | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    if env_data_dir is not None:
        env["SLM_DATA_DIR"] = str(env_data_dir)
    return subprocess.run([sys.executable, "-m", "slm_app.finetune.data", *args], capture_output=True, text=True,
                          input=stdin, env=env, cwd=Path(__file__).parent.parent, timeout=60)


def test_cli_from_feedback_store(tmp_path):
    store = FeedbackStore(tmp_path / "data" / FILE_NAME)
    for i in range(12):
        store.add(prompt=f"Question number {i} about the weather in town {i}?", output=f"answer {i}", rating=5,
                  model="m", source="api")
    store.add(prompt="What is 2+2?", output="5", rating=4, correction="4", model="m", source="api")
    store.add(prompt="what is 2 + 2", output="four", rating=5, model="m", source="api")  # duplicate prompt
    store.add(prompt="A bad answer?", output="nonsense", rating=2, model="m", source="api")
    store.add(prompt="Empty answer?", output="x", rating=5, correction="   ", model="m", source="api")
    store.add(prompt="Long?", output="y" * 5_000, rating=5, model="m", source="api")

    out = tmp_path / "splits"
    result = run_cli("--out", str(out), "--seed", "3", env_data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 17
    assert manifest["dropped"] == {"duplicate prompt": 1, "rated below 4": 1, "over 4000 characters": 1}
    # "   " is no correction (the store keeps the output then): 14 kept
    assert manifest["counts"]["kept"] == 14
    assert sum(manifest["counts"][s] for s in data.SPLITS) == 14
    rows = [json.loads(line) for s in data.SPLITS for line in (out / f"{s}.jsonl").read_text().splitlines()]
    answers = {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in rows}
    assert answers["What is 2+2?"] == "4"  # the correction replaced the answer
    assert "A bad answer?" not in answers
    for name, digest in manifest["files"].items():
        import hashlib

        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    again = tmp_path / "again"
    assert run_cli("--out", str(again), "--seed", "3", env_data_dir=tmp_path / "data").returncode == 0
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()  # deterministic


def test_cli_from_user_files(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Hi {i}, how ARE things?"},
                                                       {"role": "assistant", "content": f"Fine {i}"}]})
                              for i in range(10)) + "\n")
    out = tmp_path / "o1"
    result = run_cli("--file", str(chat), "--out", str(out), "--lowercase", "--ratios", "0.6", "0.2", "0.2")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"input": 10, "kept": 10, "train": 6, "validation": 2, "test": 2}
    assert manifest["source"] == "file:chat.jsonl" and manifest["kind"] == "chat"
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"] == first["messages"][0]["content"].lower()

    text = tmp_path / "notes.txt"
    text.write_text("First paragraph.\nStill first.\n\nSecond one.\n\n\nThird one.\n")
    out = tmp_path / "o2"
    assert run_cli("--file", str(text), "--out", str(out)).returncode == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "text" and manifest["counts"]["kept"] == 3


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]\n', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "last message must be the assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n', "messages[0]"),
    ('{"prompt": "hi"}\n', "must be an object with \"messages\""),
])
def test_cli_refuses_bad_files_clearly(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out"
    result = run_cli("--file", str(bad), "--out", str(out), "--format", "chat" if content else "auto")
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()  # nothing written


def test_bad_options_are_refused():
    with pytest.raises(RequestError, match="ratios"):
        data.DataOptions(ratios=(0.5, 0.2, 0.2))
    with pytest.raises(RequestError, match="train ratio"):
        data.DataOptions(ratios=(0.0, 0.5, 0.5))


_words = st.sampled_from(["alpha", "beta", "Gamma", "delta", "x", "", "  ", "beta!", "ALPHA", "é"])
_texts = st.lists(_words, max_size=6).map(" ".join)
_items = st.lists(st.tuples(_texts, _texts), max_size=40).map(
    lambda pairs: [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                   for p, a in pairs])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=_items, seed=st.integers(0, 2**16), lowercase=st.booleans(), dedupe=st.booleans(),
       ratios=st.sampled_from([(0.8, 0.1, 0.1), (1.0, 0.0, 0.0), (0.5, 0.25, 0.25), (0.34, 0.33, 0.33)]))
def test_cleaning_and_splitting_properties(items, seed, lowercase, dedupe, ratios):
    options = data.DataOptions(lowercase=lowercase, dedupe=dedupe, ratios=ratios, seed=seed, max_chars=40)
    try:
        prepared = data.from_file("".join(json.dumps(i) + "\n" for i in items) or "\n", options)
    except RequestError as exc:
        assert "empty" in exc.message or "no training data left" in exc.message
        return
    m = prepared.manifest
    # every input item is either kept or dropped for a counted reason
    assert m["counts"]["kept"] + sum(m["dropped"].values()) == m["counts"]["input"] == len(items)
    split_items = [i for s in data.SPLITS for i in prepared.splits[s]]
    assert len(split_items) == m["counts"]["kept"]
    for item in split_items:
        assert data.answer_of(item) and data.prompt_of(item)
        assert len(data.prompt_of(item)) + len(data.answer_of(item)) <= 40
        if lowercase:
            assert data.prompt_of(item) == data.prompt_of(item).lower()
    if dedupe:
        keys = [data._normalized(data.prompt_of(i)) for i in split_items]
        assert len(keys) == len(set(keys))
    if m["counts"]["kept"] >= 3 and ratios[1] > 0:
        assert prepared.splits["validation"] and prepared.splits["test"]
    # deterministic: the same input and options give the same splits
    again = data.from_file("".join(json.dumps(i) + "\n" for i in items), options)
    assert again.splits == prepared.splits


def test_near_duplicates_are_removed_but_paraphrases_kept():
    items = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "a"}]} for p in (
        "What is the capital city of Zorbania in the far north?",
        "what is the capital city of zorbania in the far north",  # same words: duplicate
        "What is the capital city of Zorbania in the north far?",  # same word set: near-duplicate
        "Which town is Zorbania's capital?",  # a paraphrase: kept
    )]
    prepared = data.prepare(items, data.DataOptions(), "test", "0")
    assert prepared.manifest["counts"]["kept"] == 2
    assert prepared.manifest["dropped"] == {"duplicate prompt": 1, "near-duplicate prompt": 1}
