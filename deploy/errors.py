"""Request errors and how they look on the wire: gRPC status codes and OpenAI-style HTTP bodies."""

from __future__ import annotations

import grpc

from cluster import ContextLengthError, OverloadedError, UnavailableError

# kind -> (gRPC status, HTTP status, OpenAI error type)
KINDS = {
    "invalid": (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    "out_of_range": (grpc.StatusCode.OUT_OF_RANGE, 400, "invalid_request_error"),
    "not_found": (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
    "unauthenticated": (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
    "permission_denied": (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
    "overloaded": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    "unavailable": (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
    "internal": (grpc.StatusCode.INTERNAL, 500, "server_error"),
}


RETRY_AFTER_S = 1  # an overloaded or recovering instance frees up within about a second


class RequestError(Exception):
    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param

    def __reduce__(self):  # crosses Ray process boundaries (replica -> proxy) intact
        return (RequestError, (self.kind, self.message, self.param))

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return KINDS[self.kind][0]

    @property
    def http_status(self) -> int:
        return KINDS[self.kind][1]

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers of the refusal: when to try again (gRPC clients read it in the message:
        Serve's proxy does not forward trailing metadata of a failed call)."""
        return {"Retry-After": str(RETRY_AFTER_S)} if self.kind in ("overloaded", "unavailable") else {}

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": KINDS[self.kind][2], "param": self.param,
                          "code": self.http_status}}


def classify(error: BaseException) -> RequestError:
    """Maps an engine or Serve exception (possibly wrapped by Ray) to a RequestError."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(error, RequestError):
        return error
    if isinstance(error, OverloadedError | BackPressureError):
        message = str(getattr(error, "message", None) or error).splitlines()[-1]
        return RequestError("overloaded", f"{message}; retry after {RETRY_AFTER_S} s")
    if isinstance(error, UnavailableError):
        return RequestError("unavailable", f"{_last_line(error)}; retry after {RETRY_AFTER_S} s")
    if isinstance(error, ContextLengthError):
        return RequestError("out_of_range", _last_line(error))
    if isinstance(error, ValueError):
        return RequestError("invalid", _last_line(error))
    return RequestError("internal", f"internal error: {type(error).__name__}")


def _last_line(error: BaseException) -> str:
    """Ray wraps remote exceptions with a traceback; the user needs the message alone."""
    text = str(error).strip()
    return text.splitlines()[-1].split(": ", 1)[-1] if "\n" in text else text
