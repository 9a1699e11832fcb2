"""The OpenAI-compatible HTTP API of the model server.

    app.py       routes, phase gate, error responses (the shared mapping; HTTP only)
    requests.py  request bodies -> prompt token ids + sampling params (pure, validated)
    serving.py   running a request on the instance: JSON or SSE
    sse.py       SSE framing and response objects (pure)
"""

from modelserver.openai.app import create_app

__all__ = ["create_app"]
