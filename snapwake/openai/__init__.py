"""The OpenAI API as Snapwake speaks it, shared by the gateway and the model server.

    errors.py  the one error body, and the one exception -> (status, body) mapping
    schema.py  request bodies (pydantic) with every rule the built-in model server applies
    limits.py  the rules that need the model: context length and vocabulary
    ids.py     a function's public model id

Both the gateway and the model server import this package (it imports neither), so a request
is refused by the same rule, with the same bytes, wherever it is refused first: a built-in
function's bad request costs no claim and no cold start.
"""

from snapwake.openai.errors import CODES, RETRYABLE, error_body, openai_error
from snapwake.openai.ids import model_id
from snapwake.openai.limits import ModelLimits, check_length, check_token_ids
from snapwake.openai.schema import (
    MODEL_SERVER_PATHS,
    SCHEMAS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
    ModelName,
    OpenAIRequest,
    check_serves,
    parse_body,
    parse_json,
    validate,
)

__all__ = [
    "CODES", "MODEL_SERVER_PATHS", "RETRYABLE", "SCHEMAS", "ChatCompletionRequest", "ChatMessage",
    "CompletionRequest", "EmbeddingRequest", "GenerationRequest", "ModelLimits", "ModelName", "OpenAIRequest",
    "check_length", "check_serves", "check_token_ids", "error_body", "model_id", "openai_error", "parse_body", "parse_json",
    "validate",
]
