"""Generated JSON handed to Gradio as JSON text, so every client receives the data as generated.

Why not a ``gr.JSON`` output: its value travels as a JSON object, and both ends of Gradio read
objects of a certain shape as files. ``gradio_client`` (2.5.0, ``download_files`` on by default)
walks every output with ``utils.traverse(..., is_file_obj)`` and downloads any object holding a
string ``path`` from ``/gradio_api/file=<path>`` (a 403, and the result is lost); the server
(6.17.3, ``processing_utils.async_move_files_to_cache`` after every event) treats an object with
``path`` and ``meta: {"_type": "gradio.FileData"}`` as a file to copy into its cache and serve, or
as a URL to fetch. Generated JSON is the user's data: ``{"path": "/etc/passwd", "meta": ...}`` must
come back as those characters, never as a file. Besides, ``gr.JSON`` re-encodes with orjson, which
fails on integers beyond 64 bits ("Integer exceeds 64-bit range") and loses the whole result.

Text is opaque to both walks: the client returns the string, ``json.loads`` gives the data back
exactly, big integers included, and the browser shows it in a code box.
"""

from __future__ import annotations

import json
from typing import Any

from slm_app.errors import RequestError

__all__ = ["json_text"]


def json_text(value: Any) -> str:
    """``value`` as indented JSON text; a value JSON cannot carry is a clear error, not a lost result."""
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:  # NaN/Infinity, a non-JSON type: the message names it
        raise RequestError(f"the result could not be written as JSON: {exc}", status=500, param="output") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from "\ud800" in the model's JSON): keep it escaped
        text = json.dumps(value, indent=2, ensure_ascii=True, allow_nan=False)
    return text
