"""The remote engine (``SLM_BACKEND=remote``): see ``engine``."""

from slm_app.engines.remote.engine import RemoteEngine

__all__ = ["RemoteEngine"]
