"""The OpenAI-compatible /v1 routes: ``protocol`` (wire models), ``serving`` (the logic), ``routes`` (HTTP)."""
