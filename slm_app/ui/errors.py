"""The one adapter from refused requests to the page: a ``RequestError`` becomes a ``gr.Error`` with
its message (a clear message, the app keeps serving); every tab's events use it."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterator

import gradio as gr

from slm_app.errors import RequestError


def user_errors(fn: Callable) -> Callable:
    """``fn`` with refused requests shown as ``gr.Error``. A generator function stays one (Gradio
    streams it), and the signature and docstring stay ``fn``'s (they document the API endpoint)."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator:
            try:
                yield from fn(*args, **kwargs)
            except RequestError as exc:
                raise gr.Error(exc.message, print_exception=False) from None

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RequestError as exc:
            raise gr.Error(exc.message, print_exception=False) from None

    return call
