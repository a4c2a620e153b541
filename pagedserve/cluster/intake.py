"""How a request comes in, for both front ends: the HTTP ingress and the gRPC service.

    HTTP route ──┐                       ┌──> LLMServer.generate ──> Stream
                 ├──> RequestIntake ─────┤
    gRPC method ─┘   (API key, model,    └──> model_info (tokenizer, context limit)
                      tokens, room)

One `RequestIntake` per ingress replica holds what the two share: the API key
check, the served model and its adapters, the tokenizer and the context limit
(fetched from a replica once), tokenization, the room left for the completion,
and starting a request on a replica, whose first output is awaited so that a
refusal becomes the front end's own error. The front ends keep only their wire:
how a request is read and how its outputs are written.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from typing import Any

from transformers import AutoTokenizer

from pagedserve.cluster import errors
from pagedserve.cluster.adapters import AdapterTable
from pagedserve.cluster.channel import Receiver, crosses_as_deltas
from pagedserve.cluster.errors import OpenAIError
from pagedserve.cluster.parsing import RequestBounds
from pagedserve.cluster.streams import Stream, client_error
from pagedserve.config import Config
from pagedserve.engine.capacity import context_room
from pagedserve.errors import RequestError
from pagedserve.model.embedded import served_model_name
from pagedserve.sampling_params import SamplingParams

# Serve's own logger: records land in the replica's log files and the Ray dashboard.
logger = logging.getLogger("ray.serve")


class RequestIntake:
    """Checks, tokenizes and starts requests on the LLMServer replicas behind `server`."""

    def __init__(self, server: Any, config: Config) -> None:
        self.server = server  # DeploymentHandle to LLMServer
        # Requests go over Serve's gRPC transport, as its throughput mode sends them
        # (SERVE_ENV in cluster/app.py): the handle was made in the process that built
        # the app, whose default may be Ray's actor calls, two milliseconds slower to
        # the first token (BENCHMARKS.md, "The first token's path"). Pickled, not
        # cloudpickled: a call and its outputs hold only importable types.
        self._generate = server.options(stream=True, _by_reference=False,
                                        request_serialization="pickle",
                                        response_serialization="pickle").generate
        self.config = config
        self.model_name = served_model_name(config)
        self.adapters = AdapterTable(config.lora, self.model_name)
        self.bounds = RequestBounds(max_stop_sequences=config.serving.max_stop_sequences)
        self.tokenizer: Any = None  # set by load()
        self.max_model_len = 0
        self.model_dir: str | None = None
        self._ready = asyncio.Lock()
        self._receiver = Receiver()  # outputs after the first, batched (cluster/channel.py)

    def check_api_key(self, given: str) -> None:
        """`given` is the `authorization` header (HTTP) or metadata (gRPC) value."""
        key = self.config.serving.api_key
        if key is None:
            return
        expected = f"Bearer {key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
            raise errors.unauthorized()

    def error(self, error: BaseException, params: dict[str, str] | None = None) -> OpenAIError:
        """A failure as the error a client gets (streams.client_error)."""
        return client_error(error, self.config.serving.retry_after_s, params)

    async def accept(self, req):
        """A parsed request, checked to name this model, with the tokenizer ready."""
        self.adapters.resolve(req.model)  # the base, or an adapter's name: 404 for any other
        await self.load()
        if self.config.serving.log_requests:  # off by default: prompts stay out of the logs
            logger.info("request body: %s", req.model_dump_json(exclude_none=True))
        return req

    async def load(self) -> None:
        """The tokenizer and the context limit, fetched from the engine once."""
        if self.tokenizer is not None:
            return
        async with self._ready:
            if self.tokenizer is None:
                info = await self.server.model_info.remote()
                self.max_model_len = info["max_model_len"]
                self.model_dir = info["model_dir"]
                self.tokenizer = await asyncio.to_thread(
                    AutoTokenizer.from_pretrained, info["tokenizer_dir"],
                    trust_remote_code=self.config.model.trust_remote_code)

    def prompt_ids(self, prompt: str | list[int], req) -> list[int]:
        if isinstance(prompt, str):
            prompt = self.tokenizer(prompt, add_special_tokens=req.add_special_tokens).input_ids
        return self.truncate(list(prompt), req)

    @staticmethod
    def truncate(ids: list[int], req) -> list[int]:
        """vLLM's truncate_prompt_tokens: only the prompt's last so many tokens."""
        if req.truncate_prompt_tokens is None:
            return ids
        return ids[-req.truncate_prompt_tokens:]

    @staticmethod
    def engine_id(request_id: str, index: int) -> str:
        """The engine's id of one prompt's request: unique, whatever id the client gave."""
        return f"{request_id}-{uuid.uuid4().hex[:8]}-{index}"

    def room(self, prompt_ids: list[int], req) -> int:
        """Tokens left for the completion; a request that cannot fit is refused (vLLM's
        server rule: the prompt leaves room for one, and max_tokens fits)."""
        if not prompt_ids:
            raise errors.bad_request(f"{req.prompt_param}: the prompt must have at least one "
                                     "token", req.prompt_param)
        try:
            return context_room(len(prompt_ids), self.max_model_len, req.max_tokens_requested(),
                                min_room=1)
        except RequestError as error:
            raise self.error(error, req.param_names()) from None

    async def start(self, request_id: str, ids: list[int], params: SamplingParams,
                    req) -> Stream:
        """Submit a request and wait for its first output, so refusals become errors."""
        receiver = self._receiver
        queue = receiver.open(request_id)
        try:
            generator = self._generate.remote(request_id, ids, params, receiver.inbox,
                                              self.adapters.resolve(req.model))
            first = await generator.__anext__()
        except BaseException as error:
            receiver.close(request_id)
            if not isinstance(error, Exception):
                raise
            raise self.error(error, req.param_names()) from None
        return Stream(first, generator, ids, crosses_as_deltas(params), queue,
                      lambda: receiver.close(request_id))
