"""A request the registry's API cannot read gets an answer that names the field, not silence.

FastStream sends no reply when a request body fails its model, so the caller would wait out its
timeout without knowing why. Every reply model of the API has an `error` field; this middleware
fills it instead.
"""

from __future__ import annotations

from typing import Any

from faststream.middlewares import BaseMiddleware
from pydantic import ValidationError
from tunebus.shared.delivery import field_errors


class ReplyToInvalidRequests(BaseMiddleware):
    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        try:
            return await call_next(msg)
        except ValidationError as e:
            # The first part of each error's path is the handler's argument name.
            problems = "; ".join(field_errors(e, skip=1))
            return {"error": f"invalid request on {msg.raw_message.subject}: {problems}"}
