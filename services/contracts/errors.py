"""Error kinds shared by every edge: each maps to one gRPC status and one OpenAI error type."""

from __future__ import annotations


class TandemError(Exception):
    """Base class; `code` names the gRPC status, `http_status` the HTTP one."""

    code = "INTERNAL"
    http_status = 500
    openai_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidArgument(TandemError, ValueError):
    code = "INVALID_ARGUMENT"
    http_status = 400
    openai_type = "invalid_request_error"


class NotFound(TandemError, LookupError):
    code = "NOT_FOUND"
    http_status = 404
    openai_type = "invalid_request_error"


class ResourceExhausted(TandemError):
    """A bounded queue or budget is full now; `retry_after_s` is the hint sent as HTTP `Retry-After`."""

    code = "RESOURCE_EXHAUSTED"
    http_status = 429
    openai_type = "rate_limit_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class Unavailable(TandemError):
    code = "UNAVAILABLE"
    http_status = 503
    openai_type = "server_error"


class DeadlineExceeded(TandemError, TimeoutError):
    code = "DEADLINE_EXCEEDED"
    http_status = 504
    openai_type = "timeout_error"


class Unauthenticated(TandemError, PermissionError):
    code = "UNAUTHENTICATED"
    http_status = 401
    openai_type = "invalid_request_error"
