"""The Chat tab, and feedback controls (on chat answers, on Generate's output, on Health).

Chat (``api_name="chat"``) is Gradio's ``ChatInterface`` over the service; the conversation is
rendered and trimmed to the tier's prompt limit by ``slm_app.conversation``, as the OpenAI chat route
and tool calling do (chat template, or a transcript with its stop string; oldest exchanges out first).

Feedback: 👍/👎 on an answer stores it at once (as rating 5 / 1) with the conversation, the model and
the sampling settings; the form under it then changes the rating or adds a corrected answer to that
same row. ``api_name="feedback"`` stores feedback from ``gradio_client`` (``POST /feedback`` from
HTTP). Nothing is stored unless the user sends feedback; the page says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Sequence

import gradio as gr

from slm_app.feedback import THUMB_RATING, FeedbackStore, sampling_record, store_for
from slm_app.errors import RequestError
from slm_app import conversation
from slm_app.service import GenerationService
from slm_app.ui.controls import sampling_controls
from slm_app.ui.errors import user_errors

CHAT_SAMPLING = ("max_new_tokens", "temperature", "top_p", "seed")
PRIVACY_NOTE = ("🔒 Nothing you type is stored. Only feedback you send (👍 / 👎, a rating, a correction) is "
                "saved, with the conversation it is about, to improve the model.")


def message_text(content: Any) -> str:
    """A chat message's text, whatever shape Gradio hands it in (a string, or Gradio 6's list of
    ``{"type": "text", "text": ...}`` parts); non-text parts are skipped."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or "" if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def history_turns(system_prompt: str | None, history: Sequence[dict[str, Any]], message: str | None = None
                 ) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system_prompt.strip()}] if system_prompt and system_prompt.strip() else []
    for m in history:
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("user", "assistant"):
            turns.append({"role": role, "content": message_text(m.get("content"))})
    if message is not None:
        turns.append({"role": "user", "content": message})
    return turns




def chat_stream(service: GenerationService, message: str, history: list[dict[str, Any]], system_prompt: str,
                max_new_tokens: float, temperature: float, top_p: float, seed: float | None) -> Iterator[str]:
    if not isinstance(message, str) or not message.strip():
        raise RequestError("message is empty: type something to say", param="message")
    params = service.sampling(max_new_tokens, temperature, top_p, seed=seed)
    prepared, rendered = conversation.fit(service, history_turns(system_prompt, history or [], message))
    yield from service.stream_text("chat", prepared, rendered.with_stops(params), answer=True)


# ---- the feedback form ----------------------------------------------------------------------------------

@dataclasses.dataclass
class FeedbackForm:
    saved: gr.State  # {"id": int} of the row the form edits
    answer: gr.Textbox
    rating: gr.Radio
    correction: gr.Textbox
    update: gr.Button
    status: gr.Markdown
    box: gr.Accordion

    @property
    def outputs(self) -> list[Any]:
        return [self.saved, self.answer, self.rating, self.correction, self.status]


def _form(store: FeedbackStore, label: str, open: bool = True) -> FeedbackForm:
    with gr.Accordion(label, open=open) as box:
        saved = gr.State(None)
        status = gr.Markdown(PRIVACY_NOTE)
        answer = gr.Textbox(label="Answer rated", lines=3, interactive=False)
        with gr.Row():
            rating = gr.Radio([1, 2, 3, 4, 5], label="Rating (1 = bad, 5 = great)", value=None)
            correction = gr.Textbox(label="Corrected answer (optional)", lines=3,
                                    placeholder="What the model should have answered")
        update = gr.Button("Update feedback")
    form = FeedbackForm(saved, answer, rating, correction, update, status, box)

    @user_errors
    def update_feedback(saved: dict | None, rating: Any, correction: str) -> str:
        if not saved:
            raise RequestError("click 👍 or 👎 on an answer first: that sends the feedback this form updates")
        store.update(saved["id"], rating=rating, correction=correction)
        note = " with your correction" if correction and correction.strip() else ""
        return f"✅ Feedback #{saved['id']} updated: rating {rating}{note}. {PRIVACY_NOTE}"

    # Queued (the default): Gradio shows a refused request's message as a toast only for queued events.
    update.click(update_feedback, [saved, rating, correction], status, api_visibility="private")
    return form


def _saved(feedback_id: int, rating: int, answer: str) -> tuple:
    thumb = "👍" if rating >= 4 else "👎"
    status = (f"✅ {thumb} saved as feedback #{feedback_id} (rating {rating}). Change the rating or add a corrected "
              f"answer below, then press **Update feedback**.")
    return {"id": feedback_id}, answer, rating, "", status


def build_chat_tab(service: GenerationService) -> None:
    """The Chat tab; call inside the app's ``gr.Blocks``."""
    lim = service.limits
    store = store_for(service.settings)
    with gr.Tab("Chat"):
        gr.Markdown("Chat with the loaded model. Answers stream in, the conversation is kept and sent "
                    "through the model's chat template (a plain transcript for models without one). "
                    + PRIVACY_NOTE)
        with gr.Accordion("System prompt and sampling", open=False):
            system = gr.Textbox(label="System prompt (optional)", lines=2, value="")
            tokens, temp, top_p, seed = sampling_controls(lim, tokens=64, temperature=0.7)
        chatbot = gr.Chatbot(label="Conversation", height=380, feedback_options=("Like", "Dislike"))

        @user_errors
        def chat(message: str, history: list[dict[str, Any]], system_prompt: str, max_new_tokens: float,
                 temperature: float, top_p: float, seed: float | None) -> Iterator[str]:
            """Chat with the model: send one message, get the answer streamed; the session keeps the conversation.

            Args:
                message: Your message.
                system_prompt: Optional instructions for the whole conversation.
                max_new_tokens: Tokens to generate, from 1 to the tier's limit.
                temperature: 0 is greedy (deterministic); higher is more random.
                top_p: Nucleus sampling in (0, 1]; 1 turns it off.
                seed: A whole number for reproducible sampling; -1 for random.
            """
            yield from chat_stream(service, message, history, system_prompt, max_new_tokens, temperature, top_p,
                                   seed)

        # The chat's events share the model's slots with Generate/Batch: the scheduler is the queue.
        # Our own textbox only for a stable id: ChatInterface clears the placeholder after the first turn.
        message = gr.Textbox(placeholder="Type a message...", elem_id="chat-message", submit_btn=True,
                             stop_btn=True, autofocus=False)
        gr.ChatInterface(chat, chatbot=chatbot, textbox=message, additional_inputs=[system, tokens, temp, top_p, seed],
                         api_name="chat", concurrency_limit=service.tier.parallel + service.settings.queue_size,
                         autofocus=False, fill_height=False)
        form = _form(store, "Feedback on an answer (👍 / 👎 on it first)")

        @user_errors
        def on_like(history: list[dict[str, Any]], system_prompt: str, max_new_tokens: Any, temperature: Any,
                    top_p: Any, seed: Any, like: gr.LikeData) -> tuple:
            if not isinstance(like.liked, bool) or not isinstance(like.index, int):
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            answer = message_text(history[like.index].get("content"))
            before = history_turns(system_prompt, history[: like.index])
            rating = THUMB_RATING[like.liked]
            feedback_id = store.add(
                messages=before, output=answer, rating=rating, model=service.model_id(), source="chat",
                sampling=sampling_record(zip(CHAT_SAMPLING, (max_new_tokens, temperature, top_p, seed))))
            return _saved(feedback_id, rating, answer)

        chatbot.like(on_like, [chatbot, system, tokens, temp, top_p, seed], form.outputs, api_visibility="private")

        @user_errors
        def feedback(output: str, rating: int, prompt: str = "", messages: str = "", correction: str = "",
                     model: str = "") -> dict[str, Any]:
            """Send feedback on a model's answer; it is stored for fine-tuning (rated 4-5 answers are exported).

            Args:
                output: The model's answer the feedback is about.
                rating: 1 (bad) to 5 (great).
                prompt: The prompt that was answered (give this or messages).
                messages: The conversation before the answer, as JSON: [{"role": "user", "content": "..."}].
                correction: A better answer, if you have one (it replaces the answer in the export).
                model: The model that answered; empty for the loaded one.
            """
            feedback_id = store.add(prompt=prompt or None, messages=messages or None, output=output, rating=rating,
                                    correction=correction or None, model=model or service.model_id(),
                                    source="api")
            return {"id": feedback_id, "stored": True}

        gr.api(feedback, api_name="feedback")


def build_output_feedback(service: GenerationService, prompt: gr.Textbox, output: gr.Textbox,
                          sampling: Sequence[tuple[str, gr.components.Component]]) -> None:
    """👍/👎 and the feedback form under Generate's output; ``sampling``: (name, input) pairs."""
    store = store_for(service.settings)
    with gr.Row():
        up = gr.Button("👍 Good output", size="sm")
        down = gr.Button("👎 Bad output", size="sm")
    # Collapsed until a thumb is clicked. (Rendered open here, Gradio 6.17.3's page threw a TypeError
    # from the Chat tab's Chatbot when that tab was first shown; collapsed, it does not.)
    form = _form(store, "Feedback on the output", open=False)
    names = [name for name, _ in sampling]

    def thumb(liked: bool) -> Callable:
        @user_errors
        def send(prompt_text: str, output_text: str, *values: Any) -> tuple:
            if not output_text or not output_text.strip():
                raise RequestError("there is no output to rate yet: generate something first")
            rating = THUMB_RATING[liked]
            feedback_id = store.add(prompt=prompt_text, output=output_text, rating=rating,
                                    model=service.model_id(), source="generate",
                                    sampling=sampling_record(zip(names, values)))
            return (*_saved(feedback_id, rating, output_text), gr.Accordion(open=True))

        return send

    inputs = [prompt, output, *[component for _, component in sampling]]
    up.click(thumb(True), inputs, [*form.outputs, form.box], api_visibility="private")
    down.click(thumb(False), inputs, [*form.outputs, form.box], api_visibility="private")


def build_feedback_health(service: GenerationService, refresh: gr.Button) -> None:
    """Feedback counts by rating on the Health tab, refreshed with it."""
    store = store_for(service.settings)
    counts = gr.JSON(label="Feedback (counts by rating)")
    gr.on(None, store.counts, None, counts, api_visibility="private", queue=False)  # no triggers: on page load
    refresh.click(store.counts, None, counts, api_visibility="private", queue=False)
