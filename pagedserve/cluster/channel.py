"""Step batches: a replica's outputs for many requests, one message per step.

Serve streams each request's outputs as messages of their own, so at a GPU's
token rate the serving plane pays Ray's per-message cost once per token, on
both ends. Here a request's first output still comes back through its Serve
call, so refusals and errors map as before and the first token waits for no
timer. The call stays open until the request ends, so Serve's routing, its
accounting and its cancellation (the client left, or the ingress died) are
unchanged. Every later output goes through the ingress's inbox instead:

    ingress ──generate(id, ids, params, inbox)──> LLMServer ──first output──> ingress
    LLMServer: Outbox ──one batch per send──> Inbox actor ──take()──> Receiver ──> queue per request

An Outbox (one per ingress, in the replica) keeps one batch in flight: outputs
that arrive meanwhile join the next, so a step's outputs leave together and a
slow ingress gets fewer, larger batches instead of a backlog. Batches travel
pickled once as bytes, which the Inbox stores and hands on without reading.
In a batch each output is a tuple of its fields (`pack`, `unpack`): pickling
and unpickling dataclasses costs several times as much, most of it in the
garbage collector, and at a GPU's token rate it was the largest single cost of
the ingress (BENCHMARKS.md, "Keeping up with a GPU").
A request's last output is acknowledged before its Serve call returns; an
inbox that dies fails every request waiting on it, as a dead replica would.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import pickle
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Objects allocated between collections of the youngest generation: Python's 700
# is met a few times per step by each step's outputs, which mostly live until the
# next step, and each collection then promotes them and walks them again later.
GC_YOUNG_THRESHOLD = 20_000


def collect_less_often() -> None:
    """For a serving process (an ingress or a replica): collect the young generation
    every GC_YOUNG_THRESHOLD allocations, not Python's 700."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class InboxLost(RuntimeError):
    """The ingress's inbox failed: the requests waiting on it cannot get their outputs."""


def crosses_as_deltas(params: SamplingParams) -> bool:
    """Whether a request's outputs cross to the ingress as deltas (see LLMServer.generate);
    else they are cumulative, and the ingress puts its prompt ids back in them."""
    return params.best_of == params.n or params.use_beam_search


def pack(output: RequestOutput) -> tuple:
    """A replica's output as the tuple a batch carries: the request id is the batch's."""
    metrics = output.metrics
    return (output.prompt, output.prompt_token_ids, output.finished,
            [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason,
              c.stop_reason) for c in output.outputs],
            None if metrics is None else (metrics.arrival_time, metrics.first_scheduled_time,
                                          metrics.first_token_time, metrics.finished_time),
            output.prompt_logprobs)


def unpack(request_id: str, packed: tuple) -> RequestOutput:
    """The output `pack` gave."""
    prompt, prompt_token_ids, finished, outputs, metrics, prompt_logprobs = packed
    return RequestOutput(request_id, prompt, prompt_token_ids,
                         [CompletionOutput(*fields) for fields in outputs], finished,
                         None if metrics is None else RequestMetrics(*metrics), prompt_logprobs)


def _background(coroutine) -> asyncio.Task:
    """A task of the process's own, outside the request that happened to start it.

    Ray cancels the calls a task made when the task is cancelled, and Serve
    cancels a request whose client left: a sender or reader started inside
    that request would be cancelled with it, and every other request with it.
    """
    return contextvars.Context().run(asyncio.ensure_future, coroutine)


@ray.remote(num_cpus=0)
class Inbox:
    """Batches from the replicas, held for the one ingress replica that reads them."""

    def __init__(self) -> None:
        self._batches: list[bytes] = []
        self._ready = asyncio.Event()

    async def put(self, batch: bytes) -> None:
        self._batches.append(batch)
        self._ready.set()

    async def take(self) -> list[bytes]:
        """Every batch so far, waiting for one if there is none."""
        await self._ready.wait()
        self._ready.clear()
        batches, self._batches = self._batches, []
        return batches


class Outbox:
    """The replica's end: outputs for one ingress, sent one batch at a time."""

    def __init__(self, inbox: Any) -> None:
        self._inbox = inbox
        self._batch: list[tuple[str, RequestOutput]] = []
        self._waiters: list[asyncio.Future] = []  # for the batch being filled
        self._sent_waiters: list[asyncio.Future] | None = None  # for the batch in flight
        self._sender: asyncio.Task | None = None
        self.error: BaseException | None = None  # the inbox failed: this outbox is done

    def add(self, request_id: str, output: RequestOutput) -> None:
        if self.error is not None:
            raise self.error
        self._batch.append((request_id, output))
        if self._sender is None or self._sender.done():
            # Scheduled after the tasks the same step woke, so their outputs join this batch.
            self._sender = _background(self._send())

    async def delivered(self) -> None:
        """Wait until everything added so far is in the inbox."""
        if self.error is not None:
            raise self.error
        # The batch being filled, else the one in flight, else nothing is pending.
        waiters = self._waiters if self._batch else self._sent_waiters
        if waiters is None:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        await waiter

    async def _send(self) -> None:
        while self._batch:
            batch, self._sent_waiters = self._batch, self._waiters
            self._batch, self._waiters = [], []
            try:
                await self._inbox.put.remote(pickle.dumps(
                    [(request_id, pack(output)) for request_id, output in batch],
                    protocol=pickle.HIGHEST_PROTOCOL))
            except BaseException as error:  # cancelled too: a batch is never lost silently
                self.error = error if isinstance(error, Exception) else InboxLost(
                    f"sending to the ingress's inbox was cancelled ({type(error).__name__})")
                for waiter in self._sent_waiters + self._waiters:
                    if not waiter.done():
                        waiter.set_exception(self.error)
                self._sent_waiters = None
                if not isinstance(error, Exception):
                    raise
                return
            for waiter in self._sent_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._sent_waiters = None


class Receiver:
    """The ingress's end: its Inbox actor and a queue per request that waits on it."""

    def __init__(self) -> None:
        self._inbox: Any = None
        self._reader: asyncio.Task | None = None
        self._queues: dict[str, asyncio.Queue] = {}

    @property
    def inbox(self) -> Any:
        """The Inbox actor, started on first use on this node (again after a failure)."""
        if self._inbox is None:
            # On this node and no other (not soft: a soft affinity was seen to place it on
            # another node): the inbox then lives and dies with the ingress's node, and a
            # lost node takes only the requests of its own replicas.
            node = ray.get_runtime_context().get_node_id()
            self._inbox = Inbox.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                node, soft=False)).remote()
            self._reader = _background(self._read(self._inbox))
        return self._inbox

    def open(self, request_id: str) -> asyncio.Queue:
        """The queue that gets `request_id`'s outputs, or an exception if they cannot come."""
        self._queues[request_id] = queue = asyncio.Queue()
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _read(self, inbox: Any) -> None:
        try:
            while True:
                for batch in await inbox.take.remote():
                    for request_id, packed in pickle.loads(batch):
                        queue = self._queues.get(request_id)
                        if queue is not None:  # None: the client left, the request is aborted
                            queue.put_nowait(unpack(request_id, packed))
        except BaseException as error:  # cancelled too: no request may wait on a dead reader
            self._lose(inbox, error)
            if not isinstance(error, Exception):
                raise

    def _lose(self, inbox: Any, error: BaseException) -> None:
        """Every waiting request hears that its outputs will not come."""
        logger.warning("the ingress's inbox failed: %r", error)
        if self._inbox is inbox:
            self._inbox = None  # the next request starts another
        lost = InboxLost(f"the ingress lost the outputs of its requests in flight "
                         f"({type(error).__name__})")
        for queue in self._queues.values():
            queue.put_nowait(lost)

    def shutdown(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
