"""Token counting against an upstream: its tokenizer when it exposes one, else a byte bound.

llama-cpp-python answers ``POST /extras/tokenize``, llama-server and vLLM ``POST /tokenize``.
Otherwise (OpenAI-style servers without one: TGI's OpenAI route, Ollama) a prompt counts as its UTF-8
bytes plus one: every tokenizer these servers use (byte-level BPE, SentencePiece with byte fallback)
spends at least one byte per token, plus at most one BOS, so the count never lets an over-long prompt
through; it refuses some prompts that would have fit (English is ~4 bytes per token). The same bound
saves the round trip to the upstream's tokenizer for every prompt it already proves short enough
(most of them); their exact count, for usage, is fetched while the answer streams.
"""

from __future__ import annotations

import logging

import httpx

from slm_app.engines.remote.failures import UpstreamFailure
from slm_app.errors import Failure

log = logging.getLogger(__name__)

# How the tier's prompt limit counts tokens when the upstream has no tokenize endpoint.
ESTIMATE = "estimate: UTF-8 bytes + 1 (an upper bound for byte-level BPE and SentencePiece vocabularies)"
TOKENIZE_PATHS = ("/extras/tokenize", "/tokenize")


def byte_bound(text: str) -> int:
    """An upper bound of ``text``'s token count on any byte-level vocabulary (see the module docstring)."""
    return len(text.encode("utf-8")) + 1


async def upstream_tokenize(client: httpx.AsyncClient, root: str, path: str, text: str, model: str | None
                            ) -> list[int]:
    # One body for every dialect: llama-cpp-python reads "input", llama-server "content", vLLM
    # "model" + "prompt", TGI "inputs"; each ignores the others' fields.
    body = {"input": text, "content": text, "prompt": text, "inputs": text, "model": model, "add_special": True}
    response = await client.post(f"{root}{path}", json=body)
    if response.status_code != 200:
        raise UpstreamFailure(f"POST {path} answered {response.status_code}", Failure.UPSTREAM)
    data = response.json()
    if isinstance(data, list):  # TGI: [{"id", "text", "start", "stop"}, ...]
        return [t["id"] for t in data if isinstance(t, dict) and isinstance(t.get("id"), int)]
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ValueError(f"POST {path} did not answer with token ids")
    return tokens


async def find_tokenizer(client: httpx.AsyncClient, root: str, model: str | None) -> str | None:
    """The first tokenize endpoint that answers with token ids, else None (count by ``ESTIMATE``)."""
    for path in TOKENIZE_PATHS:
        try:
            tokens = await upstream_tokenize(client, root, path, "Hello", model)
        except (httpx.HTTPError, UpstreamFailure, ValueError):
            continue
        if tokens:
            log.info("counting tokens with the upstream's %s", path)
            return path
    log.info("the upstream has no tokenize endpoint; counting tokens by %s", ESTIMATE)
    return None
