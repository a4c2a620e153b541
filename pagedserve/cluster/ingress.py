"""The OpenAI-compatible HTTP ingress: a FastAPI app served by Ray Serve.

    client ──HTTP──> OpenAIIngress (tokenizes, validates) ──handle──> LLMServer replica
           <──JSON / server-sent events── (detokenized text, usage) <──

The ingress owns everything about the wire: the API key, body limits, request
parsing (cluster/parsing.py into cluster/protocol.py's models), tokenization
and chat templates, and turning the engine's outputs into OpenAI responses
or SSE chunks (cluster/responses.py, cluster/streams.py). Client
mistakes become OpenAI-shaped errors with a 4xx status; a 500 means a bug.
"""

# No `from __future__ import annotations`: FastAPI must see the route
# parameters' real types (Request) after Serve rewrites the methods.
import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from jinja2 import TemplateSyntaxError
from ray import serve
from starlette.exceptions import HTTPException
from transformers import AutoTokenizer

from pagedserve.chat_template import NoChatTemplateError, render_chat
from pagedserve.cluster import errors, protocol, responses
from pagedserve.cluster.adapters import (
    AdapterTable,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)
from pagedserve.cluster.channel import Receiver, wire_deltas
from pagedserve.cluster.errors import OpenAIError
from pagedserve.cluster.grpc_service import GenerationService
from pagedserve.cluster.logprobs import (
    TextOffsets,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    sampled,
)
from pagedserve.cluster.parsing import Limits, parse_request
from pagedserve.cluster.streams import (
    Stream,
    client_error,
    final_outputs,
    merge,
    root_cause,
    sse,
    stream_usage,
)
from pagedserve.config import Config, served_model_name
from pagedserve.engine.limits import context_room
from pagedserve.errors import RequestError
from pagedserve.sampling_params import SamplingParams

# Serve's own logger: records land in the replica's log files and the Ray dashboard.
logger = logging.getLogger("ray.serve")
# FastAPI's own /docs, /redoc and /openapi.json would answer without the API key:
# the schema is served by a route of ours below, which checks it.
app = FastAPI(title="pagedserve", description="OpenAI-compatible API over a paged KV cache",
              docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(OpenAIError)
async def _openai_error(request: Request, error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    # Unknown routes and methods, in OpenAI's shape.
    body = OpenAIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                       code=str(error.status_code)).body()
    return JSONResponse(body, status_code=error.status_code)


def chat_prompt_ids(tokenizer, req: protocol.ChatCompletionRequest,
                    configured_template: str | None) -> list[int]:
    """A chat request's prompt, rendered with its own chat_template, else the
    configured one, else the tokenizer's; what the client got wrong is a 400."""
    template = req.chat_template if req.chat_template is not None else configured_template
    try:
        return render_chat(tokenizer, req.conversation(), template,
                           add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message,
                           **(req.chat_template_kwargs or {}))
    except NoChatTemplateError as error:
        raise errors.bad_request(str(error), "chat_template") from None
    except TemplateSyntaxError as error:
        raise errors.bad_request(f"chat_template: not a valid Jinja template: {error}",
                                 "chat_template") from None
    except Exception as error:  # noqa: BLE001 - the template rejected the messages
        raise errors.bad_request(f"messages: {error}", "messages") from None


# Here, not in app.py: each replica imports this module and needs the routes bound.
@serve.ingress(app)
class OpenAIIngress(GenerationService):
    """The routes of `app`, one instance per ingress replica (a deployment in cluster/app.py)."""

    def __init__(self, server, config: Config) -> None:
        self.server = server  # DeploymentHandle to LLMServer
        self.config = config
        self.model_name = served_model_name(config)
        self.adapters = AdapterTable(config.lora, self.model_name)
        self.created = int(time.time())
        self._tokenizer = None
        self._max_model_len = 0
        self._model_dir: str | None = None
        self._limits = Limits(max_stop_sequences=config.serving.max_stop_sequences)
        self._ready = asyncio.Lock()
        self._receiver = Receiver()  # outputs after the first, batched (cluster/channel.py)

    # -- routes ---------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await self.server.check_health.remote()
        except Exception as error:  # noqa: BLE001 - unhealthy, whatever the reason
            return JSONResponse({"status": "unhealthy", "error": str(root_cause(error))},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(app.openapi())

    @app.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        await self._load()
        return JSONResponse(responses.model_list(
            [self.model_name], self.created, root=self._model_dir,
            max_model_len=self._max_model_len,
            adapters=[(a.lora_name, a.lora_path) for a in self.adapters.adapters()]))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> PlainTextResponse:
        raw = await self._read(request)  # the API key first, as on every route
        self.adapters.check_updates_allowed()
        body = parse_request(LoadLoRAAdapterRequest, raw)
        adapter = self.adapters.new(body)
        try:  # a replica reads and checks it: a bad adapter is never listed
            await self.server.check_lora.remote(adapter)
        except Exception as error:  # noqa: BLE001 - its cause decides the status
            raise client_error(error, self.config.serving.retry_after_s,
                               {"lora_request": "lora_path"}) from None
        self.adapters.add(adapter)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added "
                                 "successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> PlainTextResponse:
        raw = await self._read(request)
        self.adapters.check_updates_allowed()
        body = parse_request(UnloadLoRAAdapterRequest, raw)
        self.adapters.remove(body)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 "successfully.")

    @app.get("/stats")
    async def stats(self, request: Request) -> JSONResponse:
        """The KV memory stats and queue lengths of the replica that answers."""
        self._authorize(request)
        return JSONResponse(await self.server.stats.remote())

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._accept(parse_request(
            protocol.CompletionRequest, await self._read(request), self._limits))
        prompts = [self._prompt_ids(p, req) for p in req.prompts()]
        # The echoed prompt: the client's text, or its tokens decoded (only when echoed).
        texts = [p if isinstance(p, str) else self._tokenizer.decode(ids) if req.echo else ""
                 for p, ids in zip(req.prompts(), prompts, strict=True)]
        params = [req.sampling_params(self._room(ids, req)) for ids in prompts]
        request_id = f"cmpl-{req.request_id or uuid.uuid4().hex}"
        fmt = responses.CompletionFormat(
            logprobs=req.logprobs, echo=req.echo, generate=not req.echo_only,
            prompt_logprobs=req.prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
            prompt_skip_special_tokens=isinstance(req.prompts()[0], str),
            tokens_as_ids=req.return_tokens_as_token_ids)
        streams = [await self._start(self._engine_id(request_id, i), ids, p, req)
                   for i, (ids, p) in enumerate(zip(prompts, params, strict=True))]
        if req.stream:
            return sse(self._stream_completion(request_id, req, streams, params[0].stop, texts,
                                                fmt), self.config.serving.retry_after_s)
        outputs = await final_outputs(streams, self.config.serving.retry_after_s)
        return JSONResponse(responses.completion_response(
            request_id, req.model, int(time.time()), outputs, texts, self._tokenizer, fmt))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = await self._accept(parse_request(
            protocol.ChatCompletionRequest, await self._read(request), self._limits))
        ids = chat_prompt_ids(self._tokenizer, req, self.config.model.chat_template)
        if req.add_special_tokens:
            ids = self._tokenizer.build_inputs_with_special_tokens(ids)
        ids = self._truncate(ids, req)
        params = req.sampling_params(self._room(ids, req))
        request_id = f"chatcmpl-{req.request_id or uuid.uuid4().hex}"
        stream = await self._start(self._engine_id(request_id, 0), ids, params, req)
        if req.stream:
            return sse(self._stream_chat(request_id, req, stream, params.stop),
                        self.config.serving.retry_after_s)
        final, = await final_outputs([stream], self.config.serving.retry_after_s)
        return JSONResponse(responses.chat_response(
            request_id, req.model, int(time.time()), final, self._tokenizer,
            req.num_top_logprobs, req.return_tokens_as_token_ids))

    # -- helpers --------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        self._check_api_key(request.headers.get("authorization", ""))

    def _check_api_key(self, given: str) -> None:
        """`given` is the `authorization` header (HTTP) or metadata (gRPC) value."""
        key = self.config.serving.api_key
        if key is None:
            return
        expected = f"Bearer {key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
            raise errors.unauthorized()

    async def _read(self, request: Request) -> bytes:
        self._authorize(request)
        limit = self.config.serving.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise errors.too_large(int(declared), limit)
        body = await request.body()
        if len(body) > limit:
            raise errors.too_large(len(body), limit)
        return body

    async def _accept(self, req):
        """A parsed request, checked to name this model, with the tokenizer ready."""
        self._check_model(req.model)
        await self._load()
        if self.config.serving.log_requests:  # off by default: prompts stay out of the logs
            logger.info("request body: %s", req.model_dump_json(exclude_none=True))
        return req

    def _check_model(self, model: str) -> None:
        self.adapters.resolve(model)  # the base, or an adapter's name: 404 for any other

    async def _load(self) -> None:
        """The tokenizer and the context limit, fetched from the engine once."""
        if self._tokenizer is not None:
            return
        async with self._ready:
            if self._tokenizer is None:
                info = await self.server.model_info.remote()
                self._max_model_len = info["max_model_len"]
                self._model_dir = info["model_dir"]
                self._tokenizer = await asyncio.to_thread(
                    AutoTokenizer.from_pretrained, info["tokenizer_dir"],
                    trust_remote_code=self.config.model.trust_remote_code)

    def _prompt_ids(self, prompt: str | list[int], req) -> list[int]:
        if isinstance(prompt, str):
            prompt = self._tokenizer(prompt, add_special_tokens=req.add_special_tokens).input_ids
        return self._truncate(list(prompt), req)

    @staticmethod
    def _truncate(ids: list[int], req) -> list[int]:
        """vLLM's truncate_prompt_tokens: only the prompt's last so many tokens."""
        if req.truncate_prompt_tokens is None:
            return ids
        return ids[-req.truncate_prompt_tokens:]

    @staticmethod
    def _engine_id(request_id: str, index: int) -> str:
        """The engine's id of one prompt's request: unique, whatever id the client gave."""
        return f"{request_id}-{uuid.uuid4().hex[:8]}-{index}"

    def _room(self, prompt_ids: list[int], req) -> int:
        """Tokens left for the completion; a request that cannot fit is refused (vLLM's
        server rule: the prompt leaves room for one, and max_tokens fits)."""
        if not prompt_ids:
            raise errors.bad_request(f"{req.prompt_param}: the prompt must have at least one "
                                     "token", req.prompt_param)
        try:
            return context_room(len(prompt_ids), self._max_model_len, req.max_tokens_requested(),
                                min_room=1)
        except RequestError as error:
            raise client_error(error, self.config.serving.retry_after_s,
                               req.param_names()) from None

    async def _start(self, request_id: str, ids: list[int], params: SamplingParams,
                     req) -> Stream:
        """Submit a request and wait for its first output, so refusals become HTTP errors."""
        receiver = self._receiver
        queue = receiver.open(request_id)
        try:
            generator = self.server.options(stream=True).generate.remote(
                request_id, ids, params, receiver.inbox, self.adapters.resolve(req.model))
            first = await generator.__anext__()
        except BaseException as error:
            receiver.close(request_id)
            if not isinstance(error, Exception):
                raise
            raise client_error(error, self.config.serving.retry_after_s,
                               req.param_names()) from None
        return Stream(first, generator, ids, wire_deltas(params), queue,
                      lambda: receiver.close(request_id))

    async def _stream_completion(self, request_id: str, req, streams: list[Stream],
                                 stop: tuple[str, ...], texts: list[str],
                                 fmt: responses.CompletionFormat) -> AsyncIterator[dict]:
        created, n = int(time.time()), len(streams[0].first.outputs)
        options = req.stream_options or protocol.StreamOptions()
        strings = TokenStrings(self._tokenizer, fmt.tokens_as_ids)
        # Each request's news, update by update; None until its first update.
        news: list[responses.StreamNews | None] = [None] * len(streams)
        offsets: dict[tuple[int, int], TextOffsets] = {}
        async for prompt_index, output in merge(streams):
            request = news[prompt_index]
            if request is None:
                stream = streams[prompt_index]
                request = news[prompt_index] = responses.StreamNews(output, stream.deltas, stop)
                sent = request.update(output)
                if fmt.echo:  # the prompt first, once per choice
                    for index in range(n):
                        text, logprobs, offset = responses.echo_text(
                            output, texts[prompt_index], fmt, strings)
                        offsets[prompt_index, index] = offset
                        yield self._with_usage(responses.completion_chunk(
                            request_id, req.model, created, prompt_index * n + index, text, None,
                            logprobs), options, request.counts, index)
            else:
                sent = request.update(output)
            for choice in sent:
                text, logprobs, index = choice.text, choice.logprobs, choice.index
                if not fmt.generate:  # echo only: the generated token is not reported
                    if choice.finish_reason is None:
                        continue
                    text, logprobs = "", None
                chunk_logprobs = None
                if req.logprobs is not None and logprobs:
                    offset = offsets.get((prompt_index, index)) or responses.output_offsets(
                        output, fmt, strings, start=0)
                    offsets[prompt_index, index] = offset
                    chunk_logprobs = completion_logprobs(sampled(logprobs), strings, offset)
                yield self._with_usage(responses.completion_chunk(
                    request_id, req.model, created, prompt_index * n + index, text,
                    choice.finish_reason, chunk_logprobs), options, request.counts, index,
                    fmt.generate)
        if options.include_usage:
            yield responses.usage_chunk(request_id, req.model, created, "text_completion",
                                        stream_usage(news, fmt.generate))

    async def _stream_chat(self, request_id: str, req, stream: Stream,
                           stop: tuple[str, ...]) -> AsyncIterator[dict]:
        created = int(time.time())
        options = req.stream_options or protocol.StreamOptions()
        strings = TokenStrings(self._tokenizer, req.return_tokens_as_token_ids)
        news = responses.StreamNews(stream.first, stream.deltas, stop)
        for index in range(len(stream.first.outputs)):
            yield self._with_usage(responses.chat_chunk(
                request_id, req.model, created, index, {"role": "assistant", "content": ""},
                None), options, news.counts, index, counted=False)
        top = req.num_top_logprobs
        async for _, output in merge([stream]):
            for choice in news.update(output):
                chunk_logprobs = (chat_logprobs(choice.logprobs, strings, top)
                                  if top is not None and choice.logprobs else None)
                if choice.text or choice.finish_reason or chunk_logprobs:
                    yield self._with_usage(responses.chat_chunk(
                        request_id, req.model, created, choice.index,
                        {"content": choice.text} if choice.text else {},
                        choice.finish_reason, chunk_logprobs), options, news.counts, choice.index)
        if options.include_usage:
            yield responses.usage_chunk(request_id, req.model, created, "chat.completion.chunk",
                                        stream_usage([news]))

    @staticmethod
    def _with_usage(chunk: dict, options: protocol.StreamOptions,
                    counts: responses.TokenCounts, index: int, counted: bool = True) -> dict:
        """vLLM's continuous_usage_stats: each chunk carries its choice's usage so far."""
        if options.continuous_usage_stats:
            chunk["usage"] = responses.usage_of([counts], counted, index)
        return chunk
