"""Ready-made JSON Schemas for the Structured JSON tab.

Kept small on purpose: every string and array is bounded so that a complete answer fits the
free tier's 96-token cap for structured output even from a tiny model, and the schemas stay
cheap to show in the prompt. Property order here is the order the model writes them in.
"""

from __future__ import annotations

from typing import Any


def _text(max_length: int, description: str) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length, "description": description}


def _list(item: dict[str, Any], max_items: int) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": 1, "maxItems": max_items}


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """All properties required, nothing else allowed: the shape the UI and the model can rely on."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False, **extra}


PRESETS: dict[str, dict[str, Any]] = {
    "Blog outline": _object({
        "title": _text(60, "Title of the post"),
        "sections": _list(_text(40, "Section heading"), 4),
    }),
    "Persona": _object({
        "name": _text(30, "Full name"),
        "age": {"type": "integer", "minimum": 18, "maximum": 90},
        "occupation": _text(30, "Job"),
        "traits": _list(_text(20, "One personality trait"), 3),
    }),
    "Blog-post feedback": _object({
        "overall_score": {"type": "integer", "minimum": 1, "maximum": 10, "description": "1 = poor, 10 = excellent"},
        "strengths": _list(_text(40, "What works"), 2),
        "improvements": _list(_text(40, "What to fix"), 2),
        "suggestions": _list(_text(40, "Concrete next step"), 2),
    }),
    # One call to one of two tools: anyOf of objects whose "name" is a const, the usual shape of
    # function calling; each tool's arguments are closed so the call can be dispatched as is.
    "Function call": {
        "anyOf": [
            _object({"name": {"const": "get_weather"},
                     "arguments": _object({"city": _text(30, "City name"),
                                           "unit": {"enum": ["celsius", "fahrenheit"]}})}),
            _object({"name": {"const": "search_web"},
                     "arguments": _object({"query": _text(60, "Search terms")})}),
        ],
    },
}
