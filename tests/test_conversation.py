"""Conversations are rendered and trimmed the same way on every surface (``slm_app.conversation``): a
long conversation loses its oldest exchanges on the OpenAI chat route as in the Chat tab, while the
system prompt and the last user turn stay, and a last turn too long by itself is still refused.
Driven through the ``openai`` SDK against the session's free-tier app."""

from __future__ import annotations

import openai
import pytest

from slm_app import conversation

SYSTEM = {"role": "system", "content": "Be brief."}


def long_history(exchanges: int, chars: int) -> list[dict[str, str]]:
    turns = []
    for i in range(exchanges):
        turns += [{"role": "user", "content": f"Question {i}: " + "x" * chars},
                  {"role": "assistant", "content": f"Answer {i}: " + "y" * chars}]
    return turns


@pytest.fixture(scope="module")
def app(free_app):
    return free_app  # the session's free-tier app: no extra launch


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_chat_trims_the_oldest_exchanges_to_the_limit(app, client) -> None:
    lim = app.service.limits
    messages = [SYSTEM, *long_history(4, lim.max_prompt_chars // 4), {"role": "user", "content": "And now?"}]
    whole = conversation.render(app.service, messages).prompt  # as the model would read it untrimmed
    assert len(whole.text) > lim.max_prompt_chars
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(model=model, max_tokens=4, messages=messages)
    assert answer.choices[0].finish_reason in ("stop", "length")
    # What the model read fits the limits, and kept the newest exchanges and the question.
    assert 0 < answer.usage.prompt_tokens <= lim.max_prompt_tokens
    kept, _ = conversation.fit(app.service, messages)
    assert "Be brief." in kept.text and "And now?" in kept.text and "Answer 3" in kept.text
    assert "Question 0" not in kept.text and kept.n_tokens == answer.usage.prompt_tokens


def test_a_last_turn_too_long_by_itself_is_still_413(app, client) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model, max_tokens=4, messages=[
            SYSTEM, {"role": "user", "content": "z" * (app.service.limits.max_prompt_chars + 10)}])
    assert info.value.status_code == 413 and info.value.body["param"] == "messages"
