"""Gemini's view of the served models (``models/{id}``), shared by the Gemini routes and
``GET /v1/models`` when a google-genai client asks there."""

from __future__ import annotations

from typing import Any

from promptcache.server.errors import ApiError
from promptcache.server.state import ServerState

METHODS = ["generateContent", "streamGenerateContent", "countTokens", "createCachedContent"]


def model_json(state: ServerState, name: str) -> dict[str, Any]:
    return {"name": f"models/{name}", "baseModelId": name, "version": "1", "displayName": name,
            "description": "served by promptcache", "inputTokenLimit": state.max_model_len,
            "outputTokenLimit": state.max_model_len, "supportedGenerationMethods": METHODS}


def list_models_json(state: ServerState) -> dict[str, Any]:
    return {"models": [model_json(state, m) for m in state.model_names]}


def served_model(state: ServerState, name: str, method: str = "generateContent") -> str:
    bare = name.removeprefix("models/")
    if bare not in state.model_names:
        raise ApiError(404, f"models/{bare} is not found for API version v1beta, or is not supported for {method}. "
                            f"This server serves: {', '.join('models/' + m for m in state.model_names)}")
    return state.model_names[0]
