"""Conversations, the same for the Chat tab, the OpenAI chat route and tool calling: render turns
into a prompt in the model's format, trim the oldest exchanges to the tier's limit, and the stop
string a transcript needs.

A model with a chat template gets the conversation through it (a remote engine sends the messages
and its upstream applies the template). A model without one gets a plain ``System: / User: /
Assistant:`` transcript that ends with ``Assistant:``, and ``TRANSCRIPT_STOP`` as an extra stop string
so a raw model does not go on to write the user's next turn.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from slm_app.backends.base import SamplingParams
from slm_app.engines.base import Message, ModelPrompt, PreparedPrompt
from slm_app.errors import RequestError
from slm_app.service import GenerationService

TRANSCRIPT_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
TRANSCRIPT_STOP = "\nUser:"
MAX_STOPS = 4  # OpenAI's limit, and the service's


@dataclass(frozen=True)
class Rendered:
    """A conversation as the model will read it; ``templated``: the chat template made it (else a transcript)."""

    prompt: ModelPrompt
    templated: bool

    @property
    def stops(self) -> tuple[str, ...]:
        """The stop strings the rendering needs."""
        return () if self.templated else (TRANSCRIPT_STOP,)

    def with_stops(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the rendering's stop strings added (as many as the limit leaves room for)."""
        extra = tuple(s for s in self.stops if s not in params.stop)[: max(0, MAX_STOPS - len(params.stop))]
        return dataclasses.replace(params, stop=params.stop + extra) if extra else params


def render(service: GenerationService, turns: list[Message]) -> Rendered:
    """The prompt for ``turns`` (``[{role, content}]``, roles system/user/assistant)."""
    prompt = service.ready().render_chat(turns)
    if prompt is not None:
        return Rendered(prompt, True)
    lines = [f"{TRANSCRIPT_LABELS[t['role']]}: {t['content']}" for t in turns]
    return Rendered(ModelPrompt("\n".join(lines + ["Assistant:"])), False)


def fit(service: GenerationService, turns: list[Message], param: str = "message") -> tuple[PreparedPrompt, Rendered]:
    """The conversation within the tier's limits, leaving out the oldest exchanges when it is too long
    (the system prompt and the last user turn stay). Raises ``RequestError`` (413) when even that is
    too long."""
    turns = list(turns)
    while True:
        rendered = render(service, turns)
        try:
            return service.check_prompt(rendered.prompt, param=param), rendered
        except RequestError as exc:
            system = 1 if turns and turns[0]["role"] == "system" else 0
            # Drop the oldest user/assistant exchange; the last user turn itself is never dropped.
            if exc.status != 413 or len(turns) - system <= 1:
                raise
            del turns[system:system + 2]
