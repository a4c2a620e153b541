"""The batches between a replica and an ingress (cluster/channel.py)."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from pagedserve.cluster.channel import InboxLost, Outbox, Receiver, pack, unpack
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput


def _output(token: int, request_id: str = "r") -> RequestOutput:
    """A replica's delta: one new token."""
    return RequestOutput(request_id, None, None, [CompletionOutput(0, f"t{token}", [token], None,
                                                                   None)], False)


class _Inbox:
    """Stands in for the Inbox actor: records each batch put; a put completes when let."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None
        self.probe = lambda: None

    @property
    def put(self) -> _Inbox:
        return self

    def remote(self, batch: bytes):
        self.probe()
        self.batches.append([(request_id, unpack(request_id, packed).outputs[0].token_ids[0])
                             for request_id, packed in pickle.loads(batch)])
        return self._ack()

    async def _ack(self) -> None:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail


def test_a_steps_outputs_leave_together_and_one_batch_is_in_flight():
    async def main() -> None:
        inbox = _Inbox()
        inbox.gate.clear()
        box = Outbox(inbox)
        for index in range(3):  # one step's outputs, for three requests
            box.add(f"r{index}", _output(index))
        await asyncio.sleep(0)
        assert inbox.batches == [[("r0", 0), ("r1", 1), ("r2", 2)]]
        in_flight = asyncio.ensure_future(box.delivered())  # sent, not yet acknowledged
        await asyncio.sleep(0)
        box.add("r0", _output(3))  # the next step's, while the first batch is in flight
        box.add("r1", _output(4))
        delivered = asyncio.ensure_future(box.delivered())
        await asyncio.sleep(0.05)
        assert len(inbox.batches) == 1 and not delivered.done() and not in_flight.done()
        inbox.gate.set()
        await asyncio.wait_for(delivered, 5)
        assert in_flight.done()
        assert inbox.batches[1] == [("r0", 3), ("r1", 4)]
        await box.delivered()  # nothing pending: returns at once

    asyncio.run(main())


def test_a_failed_inbox_fails_whoever_waits_and_every_later_add():
    async def main() -> None:
        inbox = _Inbox()
        inbox.fail = RuntimeError("the inbox died")
        box = Outbox(inbox)
        box.add("r0", _output(0))
        with pytest.raises(RuntimeError, match="the inbox died"):
            await asyncio.wait_for(box.delivered(), 5)
        assert box.error is inbox.fail
        with pytest.raises(RuntimeError, match="the inbox died"):
            box.add("r0", _output(1))

    asyncio.run(main())


def test_a_cancelled_send_fails_its_requests_instead_of_losing_their_outputs():
    """Were the sender cancelled mid-put, the requests of that batch would wait forever."""
    async def main() -> None:
        inbox = _Inbox()
        inbox.fail = asyncio.CancelledError()
        box = Outbox(inbox)
        box.add("r0", _output(0))
        with pytest.raises(InboxLost, match="cancelled"):
            await asyncio.wait_for(box.delivered(), 5)
        with pytest.raises(InboxLost):
            box.add("r1", _output(0))

    asyncio.run(main())


def test_the_sender_and_reader_run_outside_the_request_that_starts_them():
    """Ray cancels what a cancelled request started; these serve every request."""
    import contextvars

    request = contextvars.ContextVar("request", default=None)

    async def main() -> None:
        request.set("a request whose client may leave")
        seen = []
        inbox = _Inbox()
        inbox.probe = lambda: seen.append(request.get())  # where the put is submitted from
        box = Outbox(inbox)
        box.add("r0", _output(0))
        await box.delivered()
        assert seen == [None]

    asyncio.run(main())


def test_the_receiver_routes_each_output_and_a_lost_inbox_reaches_every_request(ray_cluster):
    import ray

    async def main() -> None:
        receiver = Receiver()
        first, second = receiver.open("a"), receiver.open("b")
        box = Outbox(receiver.inbox)
        for request_id, output in (("a", 1), ("b", 2), ("left", 3), ("a", 4)):
            box.add(request_id, _output(output, request_id))  # "left": its client left
        await asyncio.wait_for(box.delivered(), 30)
        assert [await first.get(), await first.get(), await second.get()] == [
            _output(1, "a"), _output(4, "a"), _output(2, "b")]
        old = receiver.inbox
        ray.kill(old)
        for queue in (first, second):
            assert isinstance(await asyncio.wait_for(queue.get(), 30), InboxLost)
        receiver.close("a")
        fresh = Outbox(receiver.inbox)  # the next request starts another inbox
        assert receiver.inbox != old
        fresh.add("b", _output(5, "b"))
        await asyncio.wait_for(fresh.delivered(), 30)
        assert await asyncio.wait_for(second.get(), 30) == _output(5, "b")
        receiver.shutdown()

    asyncio.run(main())


def test_an_output_crosses_whole():
    """Every field of every output type survives the batch's tuples: a field added to
    outputs.py and not to pack() fails here."""
    import dataclasses

    def filled(cls, **given):
        # A value per field that no default has; the nested types filled the same way.
        values = {"index": 1, "text": " hi", "token_ids": [7, 8], "cumulative_logprob": -1.5,
                  "logprobs": [{7: -0.5}, {8: -1.0}], "finish_reason": "stop",
                  "stop_reason": "###", "arrival_time": 1.0, "first_scheduled_time": 2.0,
                  "first_token_time": 3.0, "finished_time": 4.0, "request_id": "r",
                  "prompt": "a prompt", "prompt_token_ids": [1, 2], "finished": True,
                  "prompt_logprobs": [None, {2: -0.25}], **given}
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls)})

    output = filled(RequestOutput, outputs=[filled(CompletionOutput)],
                    metrics=filled(RequestMetrics))
    crossed = unpack("r", pickle.loads(pickle.dumps(pack(output))))
    assert crossed == output
    assert crossed.outputs[0].stop_reason == "###" and crossed.metrics.finished_time == 4.0
