"""OpenAI-shaped errors: the status, the body `{"error": {message, type, param, code}}`
and the headers every refusal of the API carries (HTTP, and mapped onto gRPC codes).
"""

from __future__ import annotations


class OpenAIError(Exception):
    """An error the ingress answers with `status_code` and OpenAI's error body."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def not_found_model(model: str, available: list[str]) -> OpenAIError:
    return OpenAIError(404, f"The model `{model}` does not exist. Available models: "
                       f"{', '.join(available) or '(none)'}", param="model", code="model_not_found")


def unauthorized() -> OpenAIError:
    return OpenAIError(401, "A valid API key is required, sent as `Authorization: Bearer <key>`.",
                       type="authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def too_large(size: int, limit: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is {size} bytes; the limit is {limit} bytes.")


def retry_later(message: str, retry_after_s: int, code: str | None = None) -> OpenAIError:
    """503 + Retry-After: the openai client retries these by itself, after that delay."""
    return OpenAIError(503, message, type="server_error", code=code,
                       headers={"Retry-After": str(retry_after_s)})


def overloaded(waiting: int, limit: int, retry_after_s: int) -> OpenAIError:
    return retry_later(f"The server is overloaded: {waiting} requests are waiting "
                       f"(limit {limit}). Please retry after {retry_after_s} s.", retry_after_s)
