"""The public OpenAI model id of a function (docs/CONTRACTS.md, Identifiers)."""

from __future__ import annotations

__all__ = ["DEFAULT_NAMESPACE", "model_id"]

DEFAULT_NAMESPACE = "default"


def model_id(function_id: str) -> str:
    """``name`` when the namespace is ``default``, else ``namespace/name`` (the tenant comes from
    the API key): what clients send as ``model``, and what a user image sees when its spec names
    no ``served_model_name``."""
    _, namespace, name = function_id.split("/")
    return name if namespace == DEFAULT_NAMESPACE else f"{namespace}/{name}"
