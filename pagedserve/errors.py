"""Errors that cross from the engine and its replica to the API layers.

`SamplingParams` and the engine's request checks raise `RequestError`; the
HTTP and gRPC layers map its `param` to their own field names without
reading the message, so rewording a message never changes the API.
`EngineOverloadedError` (503, retry later) and `EngineDeadError` (the replica
is being replaced) live here too, so the ingress maps them without importing
the engine and the model stack behind it.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot serve; `param` names the parameter to blame."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(param, message)  # the args rebuild it when Ray pickles it
        self.param, self.message = param, message

    def __str__(self) -> str:
        return self.message


class EngineOverloadedError(RuntimeError):
    """The waiting queue is at its bound: the client should retry later."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(waiting, limit)  # the args rebuild it when Ray pickles it
        self.waiting, self.limit = waiting, limit

    def __str__(self) -> str:
        return f"{self.waiting} requests are waiting, the limit is {self.limit}"


class EngineDeadError(RuntimeError):
    """The step loop stopped; this engine cannot serve."""
