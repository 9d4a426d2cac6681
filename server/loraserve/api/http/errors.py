"""Errors as the OpenAI API writes them: an HTTP status and `{"error": {...}}`.

A domain error takes the gRPC status of the one table in `api.errors` and that status's HTTP
counterpart here, so both APIs refuse the same request the same way; the message is the one
gRPC sends (bounded, and "internal error" for anything unexpected). At capacity the reply
carries `Retry-After`, as gRPC carries its retry hint.

Knows nothing about the endpoints.
"""

from __future__ import annotations

import logging

import grpc
from pydantic import ValidationError
from starlette.responses import JSONResponse

from loraserve.api.errors import RETRY_AFTER_S, RETRYABLE, bounded_message, status_of
from loraserve.types import MAX_MESSAGE_CHARS, clip

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
BODY_TOO_LARGE = 413


class HttpError(Exception):
    """A refusal: `code` is the gRPC status it counts as; `status` the HTTP one (413, which
    gRPC has no status for, counts as INVALID_ARGUMENT)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        status: int | None = None,
        retry_after: bool = False,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or HTTP_STATUS.get(code, 500)
        self.retry_after = retry_after
        self.param = param

    @classmethod
    def of(cls, error: BaseException) -> HttpError:
        """The refusal for a domain error (or an unexpected one: INTERNAL, nothing leaked)."""
        if isinstance(error, HttpError):
            return error
        code = status_of(error)
        message = "internal error; see server log"
        if code != grpc.StatusCode.INTERNAL:
            message = bounded_message(error)
        return cls(code, message, retry_after=isinstance(error, RETRYABLE))

    @classmethod
    def invalid_body(cls, error: ValidationError) -> HttpError:
        """Every problem pydantic found, each naming its field; the input is never echoed."""
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
            for e in error.errors(include_url=False, include_input=False, include_context=False)
        ]
        first = ".".join(str(p) for p in error.errors()[0]["loc"]) if problems else None
        message = clip("invalid request body: " + "; ".join(problems), MAX_MESSAGE_CHARS)
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message, param=first)

    def payload(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code.name.lower(),
            }
        }

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.retry_after else None
        return JSONResponse(self.payload(), status_code=self.status, headers=headers)


def log_unexpected(error: BaseException, refusal: HttpError) -> None:
    """Log what the caller only hears of as "internal error"."""
    if refusal.code == grpc.StatusCode.INTERNAL:
        log.error("an HTTP request failed", exc_info=error)
