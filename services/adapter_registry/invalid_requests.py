"""A request the registry's API cannot read gets an answer that names the field, not silence.

FastStream sends no reply when a request body fails its model, so the caller would wait out its
timeout without knowing why. Every reply model of the API has an `error` field; this middleware
fills it instead.
"""

from __future__ import annotations

from typing import Any

from faststream.middlewares import BaseMiddleware
from pydantic import ValidationError


class ReplyToInvalidRequests(BaseMiddleware):
    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        try:
            return await call_next(msg)
        except ValidationError as e:
            return {"error": f"invalid request on {msg.raw_message.subject}: {describe(e)}"}


def describe(error: ValidationError) -> str:
    """Each problem as `field: message (got value)`; the handler's own argument name left out."""
    problems = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"][1:]) or "the body"
        got = f" (got {problem['input']!r:.80})" if problem["type"] != "missing" else ""
        problems.append(f"{field}: {problem['msg']}{got}")
    return "; ".join(problems)
