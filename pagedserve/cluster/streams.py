"""Started requests as streams of outputs, and how their failures reach a client.

The ingress and the gRPC service share these: a request submitted to an
LLMServer replica is a `Stream` (its first output, then the rest); several are
merged as they come; a failure anywhere (a refusal, a full queue, a dead
engine or replica) becomes the OpenAI-shaped error a client gets, or, once a
stream has started, a last `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.types import Send

from pagedserve.cluster import errors, responses
from pagedserve.cluster.channel import InboxLost
from pagedserve.cluster.errors import OpenAIError
from pagedserve.engine.output_kinds import Accumulator
from pagedserve.errors import EngineDeadError, EngineOverloadedError, RequestError
from pagedserve.outputs import RequestOutput

_WATCHING: set[asyncio.Future] = set()


class Stream:
    """A started request: its outputs from the replica, as they crossed.

    The replica sends deltas, each choice's news only (LLMServer.generate), or,
    when `as_deltas` is False (best_of > n), cumulative outputs; either way only
    the first carries the prompt's ids, and this puts them back in the rest.
    Stream writers send the news as it comes (responses.StreamNews); only a
    whole response adds it up (`last`). With `queue`, the outputs after the
    first come through the ingress's inbox (cluster/channel.py) while `rest`,
    the Serve call, only reports how it ended: a failure there fails the
    stream, and leaving early cancels it.
    """

    def __init__(self, first: RequestOutput, rest, prompt_token_ids: list[int],
                 as_deltas: bool, queue: asyncio.Queue | None = None,
                 close: Callable[[], None] | None = None) -> None:
        self.rest, self.as_deltas = rest, as_deltas
        self._queue, self._close = queue, close
        self.prompt_token_ids = prompt_token_ids
        self.first = self._add(first)

    def _add(self, output: RequestOutput) -> RequestOutput:
        """The output with the request's prompt ids, which the replica sends only in its first."""
        if output.prompt_token_ids is None:  # this process's own copy: set in place
            output.prompt_token_ids = self.prompt_token_ids
        return output

    async def __aiter__(self):
        try:
            yield self.first
            if self.first.finished:
                return
            if self._queue is None:
                async for output in self.rest:
                    yield self._add(output)
                return
            watch, finished = asyncio.ensure_future(self._watch()), False
            _WATCHING.add(watch)  # it may outlive the stream by a moment: keep it referenced
            watch.add_done_callback(_WATCHING.discard)
            try:
                while not finished:
                    item = await self._queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    output = self._add(item)
                    finished = output.finished
                    yield output
            finally:
                if not finished and not watch.done():  # left early: abort the request
                    watch.cancel()
                    self.rest.cancel()
        finally:
            if self._close is not None:
                self._close()

    async def _watch(self) -> None:
        """The Serve call ends once the last output is in the inbox; a failure is the stream's."""
        try:
            async for _ in self.rest:
                pass
        except Exception as error:  # noqa: BLE001 - raised by the stream's reader
            self._queue.put_nowait(error)


async def last(stream: Stream) -> RequestOutput:
    """The stream's whole output once it ended: its deltas added up, or its last
    cumulative output."""
    total = Accumulator(stream.prompt_token_ids) if stream.as_deltas else None
    final = None
    async for output in stream:
        final = total.add(output) if total is not None else output
    return final


async def final_outputs(streams: list[Stream], retry_after_s: int) -> list[RequestOutput]:
    """The last output of every stream; one failure fails them all and aborts the rest."""
    tasks = [asyncio.ensure_future(last(stream)) for stream in streams]
    try:
        return await asyncio.gather(*tasks)
    except Exception as error:  # noqa: BLE001 - a dead replica mid-request: mapped to 503
        raise client_error(error, retry_after_s) from None
    finally:
        for task in tasks:
            task.cancel()  # no-ops once done; otherwise closing the stream aborts upstream


async def merge(streams: list[Stream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's position."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: Stream) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, output = await queue.get()
            if output is None:
                remaining -= 1
                continue
            yield index, output
        for task in tasks:
            task.result()  # a pump's error surfaces here
    finally:
        for task in tasks:
            task.cancel()  # the client left: cancelling aborts the requests upstream


def stream_usage(news: list[responses.StreamNews | None],
                 generated: bool = True) -> dict[str, int]:
    """Usage of a stream's requests that have had an update; `generated` False (echo
    only): no completion tokens."""
    return responses.usage_of([each.counts for each in news if each is not None], generated)


class EventStream(StreamingResponse):
    """Server-sent events as they come, one write per item of the stream (the events
    of one update of a request), and [DONE] in the write that closes the body, not
    in one of its own. Starlette's StreamingResponse otherwise: its disconnect
    handling is kept."""

    media_type = "text/event-stream"

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for events in self.body_iterator:
            await send({"type": "http.response.body", "body": events, "more_body": True})
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})


_DONE = b"data: [DONE]\n\n"


def sse(events: AsyncIterator[str], retry_after_s: int) -> EventStream:
    """A stream's events; a failure once it has started is its last event."""
    async def encoded() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event.encode()
        except Exception as error:  # noqa: BLE001 - the status is sent: report in-band
            failure = client_error(error, retry_after_s)
            yield f"data: {json.dumps(failure.body())}\n\n".encode()

    return EventStream(encoded())


def root_cause(error: BaseException) -> BaseException:
    """Ray wraps a replica's exception; the wrapped one is what happened."""
    return getattr(error, "cause", None) or error


def client_error(error: BaseException, retry_after_s: int,
                 params: dict[str, str] | None = None) -> OpenAIError:
    """An engine or Serve failure as the error a client gets.

    A RequestError's parameter is the engine's name for it; `params` maps it
    to the request's own field (`prompt_token_ids` -> `prompt`, or `messages`
    for chat; `max_tokens` -> `max_completion_tokens` when that was sent).
    """
    cause = root_cause(error)
    if isinstance(cause, OpenAIError):
        return cause
    if isinstance(cause, EngineOverloadedError):
        return errors.overloaded(cause.waiting, cause.limit, retry_after_s)
    if isinstance(cause, RequestError):
        return errors.bad_request(cause.message, (params or {}).get(cause.param, cause.param))
    if isinstance(cause, ValueError):
        return errors.bad_request(str(cause))
    if isinstance(cause, InboxLost):  # the next request gets a new inbox
        return errors.retry_later(f"{cause}; please retry after {retry_after_s} s",
                                  retry_after_s, code="ingress_unavailable")
    if isinstance(cause, EngineDeadError):  # Serve's health check replaces the replica
        return errors.retry_later(str(cause), retry_after_s, code="engine_dead")
    if isinstance(cause, (RayActorError, ActorUnavailableError)):
        # The replica's process died (or is unreachable) mid-request; Serve replaces it.
        return errors.retry_later(
            f"the model replica serving this request stopped ({type(cause).__name__}); "
            f"please retry after {retry_after_s} s", retry_after_s, code="replica_unavailable")
    if isinstance(cause, BackPressureError):
        return errors.retry_later(f"The server is overloaded: {cause}. Please retry after "
                                    f"{retry_after_s} s.", retry_after_s)
    return OpenAIError(500, f"internal error: {type(cause).__name__}: {cause}", type="server_error")
