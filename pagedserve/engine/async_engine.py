"""AsyncLLMEngine: vLLM's in-process async API over one EngineCore.

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=..., max_model_len=4096))
    async for output in engine.generate(prompt, SamplingParams(...), request_id="1"):
        ...

One step thread drives the engine; everything else talks to it through a
queue of commands, applied between steps:

    generate() ──("add", id, tokens, params)──> commands ──> step thread: core.step()
       ^                                                          │
       └──────── asyncio queue per request <──── RequestOutput ───┘

Requests from any number of `generate` calls are batched together. The
thread sleeps while nothing is pending. A consumer that stops iterating (it
left, or was cancelled) aborts its request, whose blocks are freed at the
next step boundary. Outputs are cumulative inside; a consumer that lags takes
the newest, so it gets fewer, larger updates rather than a backlog, and
`SamplingParams.output_kind` turns them into deltas or the final one only.
It needs no Ray: with the local executor it is the GPU machine's path too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from pagedserve import config as config_module
from pagedserve.config import Config, config_from_fields
from pagedserve.engine.core import EngineCore, PromptInput
from pagedserve.engine.output_kinds import merge
from pagedserve.engine.stats import EngineStats
from pagedserve.errors import EngineDeadError
from pagedserve.lora_request import LoRARequest
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from pagedserve.worker.ray_worker import Ranks

logger = logging.getLogger(__name__)


class AsyncEngineArgs:
    """vLLM's engine arguments: the model, and any field of the model, engine and
    parallel config sections by name (config.py holds their defaults)."""

    def __init__(self, model: str | None = None, **fields: Any) -> None:
        self.model, self.fields = model, fields
        self.config = config_from_fields(model, fields, source="AsyncEngineArgs")


class AsyncLLMEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue | _Handoff]] = {}
        self._adding: set[str] = set()  # sent, not yet in the scheduler: they wait too
        self._error: BaseException | None = None
        self._stats = core.stats()  # the step thread replaces it after every step
        self.on_step: Callable[[EngineStats], None] | None = None  # called after each step
        self._thread = threading.Thread(target=self._run, name="pagedserve-step-loop",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: AsyncEngineArgs) -> AsyncLLMEngine:
        return cls.from_config(args.config)

    @classmethod
    def from_config(cls, config: Config | str, ranks: Ranks | None = None) -> AsyncLLMEngine:
        """From a Config, or the path of a YAML config file (see configs/). `ranks`: Ray
        rank actors already started for it (worker/ray_worker.py)."""
        if not isinstance(config, Config):
            config = config_module.load(config)
        return cls(EngineCore.from_config(config, ranks))

    # -- requests -----------------------------------------------------------------------
    async def generate(self, prompt: PromptInput, sampling_params: SamplingParams,
                       request_id: str, lora_request: LoRARequest | None = None,
                       on_output: Callable[[RequestOutput], None] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as steps produce them, the last one finished.

        Refusals (a bad prompt, limits, an adapter that cannot be loaded) raise at
        the first iteration. `request_id` must be a str, as in vLLM. With
        `on_output`, only the first output is yielded: the later ones go to
        `on_output` on this event loop as each step hands them over, with no
        wake-up of this generator per step, and the generator ends when the
        request finishes or raises what failed it (what `on_output` raised too).
        """
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str (vLLM's type), got "
                            f"{type(request_id).__name__} {request_id!r}: pass "
                            f"request_id={str(request_id)!r}")
        self._raise_if_dead()
        prompt_token_ids = self.core.prompt_token_ids(prompt)
        self.core.validate(prompt_token_ids, sampling_params)  # reads only limits
        grammar = None
        if sampling_params.structured_outputs is not None:
            grammar = await self._compiled(sampling_params.structured_outputs)
        if request_id in self._streams or request_id in self._adding:
            raise ValueError(f"request_id {request_id!r} is already running")
        outputs: asyncio.Queue = asyncio.Queue()
        handoff = None if on_output is None else _Handoff(outputs, on_output)
        self._streams[request_id] = (asyncio.get_running_loop(), handoff or outputs)
        self._adding.add(request_id)
        self._send("add", request_id, prompt_token_ids, sampling_params,
                   prompt if isinstance(prompt, str) else None, lora_request, grammar)
        delta = sampling_params.output_kind is RequestOutputKind.DELTA
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                # A consumer that lags behind the steps gets one message for them all:
                # the newest cumulative output, or the deltas merged.
                while not isinstance(item, BaseException) and not outputs.empty():
                    newer = outputs.get_nowait()
                    item = newer if isinstance(newer, BaseException) or not delta else merge(
                        item, newer)
                if isinstance(item, BaseException):
                    raise item
                if item is _HANDED_OVER:  # on_output had the last one
                    finished = True
                    break
                finished = item.finished
                if handoff is not None:
                    handoff.taken = True  # the next ones go to on_output
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the consumer left early: give the blocks back
                self._send("abort", request_id)

    async def _compiled(self, params: StructuredOutputsParams):
        """The request's grammar, compiled on the compiler's threads while this loop and
        the engine's go on; a compile past the time limit fails this request only."""
        compiler = self.core.structured.compiler
        future = asyncio.wrap_future(compiler.submit(params))
        try:  # shielded: the compile stays cached for the next request with this spec
            return await asyncio.wait_for(asyncio.shield(future), compiler.limits.compile_timeout_s)
        except asyncio.TimeoutError:
            raise compiler.timeout_error(params) from None

    async def abort(self, request_id: str) -> None:
        """Stop a request: its generator ends with its last output (finish reason
        "abort") and its blocks are freed. An unknown id is a no-op."""
        self._send("abort", request_id)

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Register an adapter ahead of its requests; RequestError if it cannot serve."""
        await self._ask(lambda: self.core.add_lora(lora_request))

    async def remove_lora(self, lora_id: int) -> bool:
        """Unload an adapter; one in use goes when its last request ends (False)."""
        return await self._ask(lambda: self.core.remove_lora(lora_id))

    async def list_loras(self) -> list[LoRARequest]:
        return await self._ask(self.core.list_loras)

    async def resident_loras(self) -> list[str]:
        """The names of the adapters in device slots."""
        return await self._ask(self.core.resident_loras)

    # -- state ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The engine as of the last step."""
        return self._stats

    @property
    def num_pending(self) -> int:
        """Requests sent and not yet in the scheduler."""
        return len(self._adding)

    async def get_memory_stats(self) -> dict[str, float | int]:
        """The KV memory stats and queue lengths, read between steps."""
        return await self._ask(self.core.get_memory_stats)

    async def get_step_stats(self) -> dict[str, float | int]:
        """steps, device_s, wall_s and host_s of the steps so far (EngineCore.get_step_stats)."""
        return await self._ask(self.core.get_step_stats)

    async def get_spec_decode_stats(self) -> dict[str, float]:
        """Speculative decoding so far (EngineCore.get_spec_decode_stats)."""
        return await self._ask(self.core.get_spec_decode_stats)

    async def cached_block_keys(self) -> list:
        return await self._ask(self.core.cached_block_keys)

    @property
    def worker_pids(self) -> list[int]:
        return self.core.worker_pids

    @property
    def info(self):
        return self.core.info

    async def get_tokenizer(self):
        return self.core.tokenizer

    async def check_health(self) -> None:
        """Raises EngineDeadError once the step loop has stopped."""
        self._raise_if_dead()

    def _raise_if_dead(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine's step loop is not running: {self._error!r}")

    def shutdown(self) -> None:
        """Stop the step loop, then the workers."""
        self._send("stop")
        self._thread.join(timeout=30)
        self.core.shutdown()

    # -- the step thread --------------------------------------------------------------
    def _send(self, *message: Any) -> None:
        self._commands.put(message)
        self._wakeup.set()

    async def _ask(self, read: Callable[[], Any]) -> Any:
        """`read()`'s answer, computed by the step thread between steps."""
        self._raise_if_dead()
        answer: concurrent.futures.Future = concurrent.futures.Future()
        self._send("ask", read, answer)
        return await asyncio.wrap_future(answer)

    def _run(self) -> None:
        try:
            while self._apply_commands():
                if not self.core.has_unfinished_requests():
                    self._stats = self.core.stats()  # aborts may have freed blocks
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                outputs = self.core.step()
                self._stats = self.core.stats()  # before anyone hears of the step
                self._deliver_all(outputs)
                if self.on_step is not None:
                    self.on_step(self._stats)
        except BaseException as error:  # every waiter must hear of it
            logger.exception("the step loop died")
            self._error = error
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"the engine stopped: {error!r}"))

    def _apply_commands(self) -> bool:
        """Apply what arrived since the last step; False once asked to stop."""
        while True:
            try:
                kind, *args = self._commands.get_nowait()
            except queue.Empty:
                return True
            if kind == "add":
                request_id, prompt_token_ids, params, prompt, lora_request, grammar = args
                try:
                    self.core.add_request(request_id, prompt_token_ids, params, prompt=prompt,
                                          lora_request=lora_request, grammar=grammar)
                except ValueError as error:
                    self._deliver(request_id, error)
                finally:
                    self._adding.discard(request_id)
            elif kind == "abort":
                self._abort(args[0])
            elif kind == "ask":
                read, answer = args
                try:
                    answer.set_result(read())
                except Exception as error:  # noqa: BLE001 - the asker gets it
                    answer.set_exception(error)
            elif kind == "stop":
                return False

    def _abort(self, request_id: str) -> None:
        output = self.core.abort_request(request_id)
        if output is not None:  # its generator ends with the aborted state
            self._deliver(request_id, output)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # its event loop closed: nobody is listening any more
                self._streams.pop(request_id, None)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs: one wakeup per event loop, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # its event loop closed: nobody is listening any more
                for request_id in [i for i, (owner, _) in self._streams.items() if owner is loop]:
                    self._streams.pop(request_id, None)


_HANDED_OVER = object()  # a Handoff's request finished


class _Handoff:
    """Where a step puts the outputs of a request generated with `on_output`: the
    queue until its generator has taken the first, then `on_output`."""

    def __init__(self, queue: asyncio.Queue, on_output: Callable[[RequestOutput], None]) -> None:
        self.queue, self.on_output = queue, on_output
        self.taken = False

    def put_nowait(self, item: RequestOutput | BaseException) -> None:
        if not self.taken or isinstance(item, BaseException):
            self.queue.put_nowait(item)
            return
        try:
            self.on_output(item)
        except Exception as error:  # noqa: BLE001 - the request's generator raises it
            self.queue.put_nowait(error)
            return
        if item.finished:
            self.queue.put_nowait(_HANDED_OVER)


def _put_all(items: list[tuple[asyncio.Queue | _Handoff, RequestOutput]]) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)
