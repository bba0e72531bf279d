"""Engines: what the service runs requests on. ``base.Engine`` is the one interface; ``local`` (a
backend under the scheduler) and ``remote`` (an OpenAI-compatible upstream) are its two siblings.
``load_engine`` picks one from the settings; nothing outside this package asks which it got."""

from __future__ import annotations

from typing import Callable

from slm_app.engines.base import Engine
from slm_app.engines.local import LocalEngine
from slm_app.engines.remote import RemoteEngine
from slm_app.settings import ResolvedTier, Settings


def load_engine(settings: Settings, tier: ResolvedTier, on_availability: Callable[[bool], None] | None = None
                ) -> Engine:
    """The engine the tier asks for: an OpenAI-compatible upstream for ``SLM_BACKEND=remote``, else a
    local backend under the scheduler. Raises ``BackendUnavailable`` (or what loading raised)."""
    if tier.backend == "remote":  # an OpenAI-compatible server holds the model
        return RemoteEngine.from_settings(settings, tier.parallel, prompt_token_limit=tier.limits.max_prompt_tokens,
                                          on_availability=on_availability)
    return LocalEngine.load_from(tier.engine_config(settings), settings.queue_size)
