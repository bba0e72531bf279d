"""Chat and feedback, driven as users drive them: gradio_client for the Chat tab's API and the
``feedback`` endpoint, HTTP for ``POST /feedback`` and ``GET /feedback/export``, against the whole app
on the fake model (what the model says does not matter here; that the conversation reaches it does).

The app is launched twice on the same data dir to show that feedback survives a restart.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from conftest import launch_app
from slm_app.backends.fake import SCRIPT
from slm_app.feedback import FILE_NAME
from slm_app.settings import Settings

pytestmark = pytest.mark.timeout(300)


def fake_settings(root: Path) -> Settings:
    # 5 ms per step: a 16-token answer streams over ~80 ms, enough to see several partial texts.
    return Settings(tier="free", backend="fake", cache_dir=str(root / "cache"), data_dir=str(root / "data"),
                    fake_step_ms=5)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("chat-feedback")


@pytest.fixture(scope="module")
def app(data_root):
    with launch_app(fake_settings(data_root)) as server:
        yield server


@pytest.fixture
def client(app) -> Client:
    return Client(app.url, verbose=False)


class PromptLog:
    """Records the prompt text of each request the engine receives (the real submit still runs)."""

    def __init__(self, engine):
        self.engine, self.texts, self._submit = engine, [], engine.submit

    def __enter__(self):
        def submit(prompt, *args, **kwargs):
            self.texts.append(prompt.text)
            return self._submit(prompt, *args, **kwargs)

        self.engine.submit = submit
        return self

    def __exit__(self, *exc):
        del self.engine.submit  # back to the class's method


def chat_turn(client: Client, message: str, system: str = "", tokens: int = 16) -> tuple[list[str], str]:
    job = client.submit(message, system, tokens, 0, 1.0, 0, api_name="/chat")
    partials = [p for p in job]
    return partials, job.result()


def test_multi_turn_chat_streams_and_keeps_context(app, client) -> None:
    with PromptLog(app.service.engine) as log:
        partials, first = chat_turn(client, "Hi, who are you?", system="Answer briefly.")
        _, second = chat_turn(client, "Say that again.", system="Answer briefly.")

    # Streamed: several growing partial answers, the last one the whole answer.
    assert first and SCRIPT.startswith(first[:20]), first
    distinct = list(dict.fromkeys(partials))
    assert len(distinct) > 2 and distinct[-1] == first, partials
    assert all(b.startswith(a) for a, b in zip(distinct, distinct[1:])), distinct

    # The fake model has no chat template: the conversation goes in as a transcript, and the second
    # turn carries the system prompt, the first exchange and the new message.
    assert log.texts[0] == "System: Answer briefly.\nUser: Hi, who are you?\nAssistant:"
    assert log.texts[1] == (f"System: Answer briefly.\nUser: Hi, who are you?\nAssistant: {first}\n"
                            f"User: Say that again.\nAssistant:")
    assert second == first  # greedy, same model: the same answer


def test_a_new_client_starts_a_new_conversation(app, client) -> None:
    chat_turn(client, "First message")
    with PromptLog(app.service.engine) as log:
        chat_turn(Client(app.url, verbose=False), "Another person")
    assert log.texts == ["User: Another person\nAssistant:"]


def test_chat_drops_oldest_turns_past_the_prompt_limit(app, client) -> None:
    limit = app.service.limits.max_prompt_tokens  # 256 on the free tier
    long_message = "word " * (limit // 2)
    with PromptLog(app.service.engine) as log:
        chat_turn(client, long_message)
        chat_turn(client, "and now a second one " + "x " * (limit // 2))
    # The second prompt would not fit with the first exchange: it was left out, the new turn kept.
    assert log.texts[1].startswith("User: and now a second one"), log.texts[1][:80]


def test_chat_refuses_bad_settings_with_a_clear_message(client) -> None:
    with pytest.raises(AppError, match="max_new_tokens must be between 1 and 32"):
        client.predict("hello", "", 500, 0, 1.0, 0, api_name="/chat")
    with pytest.raises(AppError, match="message is empty"):
        client.predict("   ", "", 8, 0, 1.0, 0, api_name="/chat")


def rest(app, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, app.url.rstrip("/") + path, timeout=30, **kwargs)


def test_feedback_from_api_and_rest_lands_in_sqlite(app, client, data_root) -> None:
    via_api = client.predict("Paris.", 5, prompt="Capital of France?", api_name="/feedback")
    assert via_api["stored"] is True
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    via_api_messages = client.predict("5", 2, messages=json.dumps(messages), correction="4", api_name="/feedback")
    via_rest = rest(app, "POST", "/feedback", json={
        "messages": messages, "output": "4", "rating": 4, "sampling": {"temperature": 0.2}})
    assert via_rest.status_code == 200, via_rest.text
    assert via_rest.json()["stored"] is True

    db = sqlite3.connect(data_root / "data" / FILE_NAME)
    db.row_factory = sqlite3.Row
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = {r["id"]: r for r in db.execute("SELECT * FROM feedback")}
    a, b, c = rows[via_api["id"]], rows[via_api_messages["id"]], rows[via_rest.json()["id"]]
    assert (a["source"], a["prompt"], a["output"], a["rating"], a["model"]) == \
        ("api", "Capital of France?", "Paris.", 5, "fake-gpt2-script")
    assert a["created_at"].endswith("+00:00")
    assert (b["source"], json.loads(b["messages"]), b["correction"], b["rating"]) == ("api", messages, "4", 2)
    assert (c["source"], c["rating"], json.loads(c["sampling"])) == ("rest", 4, {"temperature": 0.2})


@pytest.mark.parametrize("body, message", [
    ({"prompt": "q", "output": "a", "rating": 7}, "rating must be a whole number from 1 to 5, got 7"),
    ({"prompt": "q", "output": "", "rating": 3}, "output is empty"),
    ({"output": "a", "rating": 3}, "give either prompt or messages"),
    ({"prompt": "q", "messages": [{"role": "user", "content": "q"}], "output": "a", "rating": 3},
     "give either prompt or messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "output": "a",
      "rating": 3}, "messages must end with the user's turn"),
    ({"messages": [{"role": "robot", "content": "q"}], "output": "a", "rating": 3}, "messages[0].role 'robot'"),
    ({"prompt": "q", "output": "a", "rating": 3, "ratting": 4}, "ratting: Extra inputs are not permitted"),
])
def test_rest_feedback_refuses_bad_input(app, body, message) -> None:
    response = rest(app, "POST", "/feedback", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_api_feedback_refuses_bad_rating(client) -> None:
    with pytest.raises(AppError, match="rating must be a whole number from 1 to 5"):
        client.predict("answer", 0, prompt="question", api_name="/feedback")


def test_export_has_only_rated_4_or_5_with_corrections_and_no_duplicates(app) -> None:
    before = rest(app, "GET", "/feedback/export").text.splitlines()
    sent = [
        {"prompt": "Name a colour.", "output": "Blue.", "rating": 5},
        {"prompt": "Name a colour.", "output": "Blue.", "rating": 4},  # the same example again
        {"prompt": "Name a fruit.", "output": "A car.", "rating": 1},
        {"prompt": "Name a fruit.", "output": "Apple, I think", "rating": 4, "correction": "An apple."},
        {"prompt": "Name a tree.", "output": "Oak.", "rating": 3},
    ]
    for body in sent:
        assert rest(app, "POST", "/feedback", json=body).status_code == 200
    response = rest(app, "GET", "/feedback/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jsonl")
    lines = response.text.splitlines()
    examples = [json.loads(line) for line in lines]  # every line is JSON
    new = [json.loads(line) for line in lines if line not in before]
    assert new == [
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
        {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]},
    ]
    for example in examples:
        roles = [m["role"] for m in example["messages"]]
        assert roles[-1] == "assistant" and roles[-2] == "user" and set(example) == {"messages"}
    assert len({json.dumps(e, sort_keys=True) for e in examples}) == len(examples)  # no duplicates
    assert not any("A car." in line or "Oak." in line for line in lines)  # rated below 4: left out


def test_feedback_counts_by_rating(app) -> None:
    counts = rest(app, "GET", "/feedback/stats").json()
    assert set(counts) == {"1", "2", "3", "4", "5", "total"}
    assert counts["total"] == sum(counts[str(r)] for r in range(1, 6)) > 0


def test_feedback_survives_an_app_restart(app, client, data_root) -> None:
    marker = client.predict("kept across restarts", 5, prompt="Does it persist?", api_name="/feedback")["id"]
    counts = rest(app, "GET", "/feedback/stats").json()
    export = rest(app, "GET", "/feedback/export").text
    app.stop()  # the module's app: later tests in this module would need a new one

    with launch_app(fake_settings(data_root)) as again:
        assert httpx.get(again.url + "feedback/stats", timeout=30).json() == counts
        assert httpx.get(again.url + "feedback/export", timeout=30).text == export
        assert "kept across restarts" in export
        after = Client(again.url, verbose=False).predict("one more", 4, prompt="q", api_name="/feedback")["id"]
        assert after > marker
