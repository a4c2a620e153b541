"""Errors about one request, carrying the parameter at fault.

`SamplingParams` and the engine's request checks raise `RequestError`; the
HTTP and gRPC layers map its `param` to their own field names without
reading the message, so rewording a message never changes the API.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot serve; `param` names the parameter to blame."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(param, message)  # the args rebuild it when Ray pickles it
        self.param, self.message = param, message

    def __str__(self) -> str:
        return self.message
