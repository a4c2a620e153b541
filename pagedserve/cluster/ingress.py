"""The OpenAI-compatible HTTP ingress: a FastAPI app served by Ray Serve.

    client ──HTTP──> OpenAIIngress (tokenizes, validates) ──handle──> LLMServer replica
           <──JSON / server-sent events── (detokenized text, usage) <──

The ingress owns the HTTP wire: body limits, request parsing (cluster/parsing.py
into cluster/protocol.py's models), chat templates, and turning the engine's
outputs into OpenAI responses or SSE chunks (cluster/responses.py,
cluster/streams.py). The API key, the model check, tokenization, the context
rule and starting a request are RequestIntake's (cluster/intake.py), which the
gRPC service (cluster/grpc_service.py) takes its requests in through too.
Client mistakes become OpenAI-shaped errors with a 4xx status; a 500 means a bug.
"""

# No `from __future__ import annotations`: FastAPI must see the route
# parameters' real types (Request) after Serve rewrites the methods.
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from jinja2 import TemplateSyntaxError
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from starlette.exceptions import HTTPException

from pagedserve.chat_template import NoChatTemplateError, render_chat
from pagedserve.cluster import errors, protocol, responses
from pagedserve.cluster.adapters import (
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
)
from pagedserve.cluster.channel import collect_less_often
from pagedserve.cluster.chat_protocol import ChatCompletionRequest
from pagedserve.cluster.errors import OpenAIError
from pagedserve.cluster.grpc_service import GenerationService
from pagedserve.cluster.intake import RequestIntake
from pagedserve.cluster.logprobs import (
    TextOffsets,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    sampled,
)
from pagedserve.cluster.parsing import parse_request
from pagedserve.cluster.proto import pagedserve_pb2 as pb
from pagedserve.cluster.streams import (
    Stream,
    final_outputs,
    merge,
    root_cause,
    sse,
    stream_usage,
)
from pagedserve.cluster.tools import ToolCalling, called
from pagedserve.config import Config

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


def chat_prompt_ids(tokenizer, req: ChatCompletionRequest,
                    configured_template: str | None) -> list[int]:
    """A chat request's prompt, rendered with its own chat_template, else the
    configured one, else the tokenizer's; what the client got wrong is a 400."""
    template = req.chat_template if req.chat_template is not None else configured_template
    try:
        return render_chat(tokenizer, req.conversation(), template,
                           add_generation_prompt=req.add_generation_prompt,
                           continue_final_message=req.continue_final_message,
                           tools=req.template_tools(), **(req.chat_template_kwargs or {}))
    except NoChatTemplateError as error:
        raise errors.bad_request(str(error), "chat_template") from None
    except TemplateSyntaxError as error:
        raise errors.bad_request(f"chat_template: not a valid Jinja template: {error}",
                                 "chat_template") from None
    except Exception as error:  # noqa: BLE001 - the template rejected the messages
        raise errors.bad_request(f"messages: {error}", "messages") from None


# Here, not in app.py: each replica imports this module and needs the routes bound.
@serve.ingress(app)
class OpenAIIngress:
    """The routes of `app` and the gRPC service's methods, one instance per ingress
    replica (a deployment in cluster/app.py); both take requests in through one
    RequestIntake (cluster/intake.py)."""

    def __init__(self, server, config: Config) -> None:
        collect_less_often()
        self.config = config
        self.intake = RequestIntake(server, config)  # shared with the gRPC service
        self.generation = GenerationService(self.intake)
        self.created = int(time.time())

    # -- routes ---------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> JSONResponse:
        try:
            await self.intake.server.check_health.remote()
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
        intake = self.intake
        await intake.load()
        return JSONResponse(responses.model_list(
            [intake.model_name], self.created, root=intake.model_dir,
            max_model_len=intake.max_model_len,
            adapters=[(a.lora_name, a.lora_path) for a in intake.adapters.adapters()]))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> PlainTextResponse:
        raw = await self._read(request)  # the API key first, as on every route
        self.intake.adapters.check_updates_allowed()
        body = parse_request(LoadLoRAAdapterRequest, raw)
        adapter = self.intake.adapters.new(body)
        try:  # a replica reads and checks it: a bad adapter is never listed
            await self.intake.server.check_lora.remote(adapter)
        except Exception as error:  # noqa: BLE001 - its cause decides the status
            raise self.intake.error(error, {"lora_request": "lora_path"}) from None
        self.intake.adapters.add(adapter)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added "
                                 "successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> PlainTextResponse:
        raw = await self._read(request)
        self.intake.adapters.check_updates_allowed()
        body = parse_request(UnloadLoRAAdapterRequest, raw)
        self.intake.adapters.remove(body)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 "successfully.")

    @app.get("/stats")
    async def stats(self, request: Request) -> JSONResponse:
        """The KV memory stats and queue lengths of the replica that answers."""
        self._authorize(request)
        return JSONResponse(await self.intake.server.stats.remote())

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self.intake.accept(parse_request(
            protocol.CompletionRequest, await self._read(request), self.intake.bounds))
        prompts = [self.intake.prompt_ids(p, req) for p in req.prompts()]
        # The echoed prompt: the client's text, or its tokens decoded (only when echoed).
        texts = [p if isinstance(p, str) else self.intake.tokenizer.decode(ids) if req.echo else ""
                 for p, ids in zip(req.prompts(), prompts, strict=True)]
        params = [req.sampling_params(self.intake.room(ids, req)) for ids in prompts]
        request_id = f"cmpl-{req.request_id or uuid.uuid4().hex}"
        fmt = responses.CompletionFormat(
            logprobs=req.logprobs, echo=req.echo, generate=not req.echo_only,
            prompt_logprobs=req.prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
            prompt_skip_special_tokens=isinstance(req.prompts()[0], str),
            tokens_as_ids=req.return_tokens_as_token_ids)
        streams = [await self.intake.start(self.intake.engine_id(request_id, i), ids, p, req)
                   for i, (ids, p) in enumerate(zip(prompts, params, strict=True))]
        if req.stream:
            return sse(self._stream_completion(request_id, req, streams, params[0].stop, texts,
                                                fmt), self.config.serving.retry_after_s)
        outputs = await final_outputs(streams, self.config.serving.retry_after_s)
        return JSONResponse(responses.completion_response(
            request_id, req.model, int(time.time()), outputs, texts, self.intake.tokenizer, fmt))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = await self.intake.accept(parse_request(
            ChatCompletionRequest, await self._read(request), self.intake.bounds))
        ids = chat_prompt_ids(self.intake.tokenizer, req, self.config.model.chat_template)
        if req.add_special_tokens:
            ids = self.intake.tokenizer.build_inputs_with_special_tokens(ids)
        ids = self.intake.truncate(ids, req)
        params = req.sampling_params(self.intake.room(ids, req))
        tool_calling = ToolCalling.of(req.tools, req.effective_tool_choice,
                                      req.parallel_tool_calls, self.config.serving.tool_call_parser)
        if tool_calling is not None and tool_calling.parser.keeps_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)  # the format's marker
        request_id = f"chatcmpl-{req.request_id or uuid.uuid4().hex}"
        stream = await self.intake.start(self.intake.engine_id(request_id, 0), ids, params, req)
        if req.stream:
            return sse(self._stream_chat(request_id, req, stream, params.stop, tool_calling),
                        self.config.serving.retry_after_s)
        final, = await final_outputs([stream], self.config.serving.retry_after_s)
        return JSONResponse(responses.chat_response(
            request_id, req.model, int(time.time()), final, self.intake.tokenizer,
            req.num_top_logprobs, req.return_tokens_as_token_ids, tool_calling))

    # -- gRPC (Serve's gRPC proxy calls the methods named like the RPCs) ------
    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> pb.GenerateReply:
        return await self.generation.generate(request, grpc_context)

    async def GenerateStream(self, request: pb.GenerateRequest,
                             grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateReply]:
        async for reply in self.generation.generate_stream(request, grpc_context):
            yield reply

    # -- helpers --------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        self.intake.check_api_key(request.headers.get("authorization", ""))

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

    async def _stream_completion(self, request_id: str, req, streams: list[Stream],
                                 stop: tuple[str, ...], texts: list[str],
                                 fmt: responses.CompletionFormat) -> AsyncIterator[str]:
        """The events of a completion stream, those of one update together."""
        n = len(streams[0].first.outputs)
        chunks = responses.Chunks(request_id, req.model, int(time.time()), "text_completion")
        options = req.stream_options or protocol.StreamOptions()
        strings = TokenStrings(self.intake.tokenizer, fmt.tokens_as_ids)
        # Each request's news, update by update; None until its first update.
        news: list[responses.StreamNews | None] = [None] * len(streams)
        offsets: dict[tuple[int, int], TextOffsets] = {}
        async for prompt_index, output in merge(streams):
            events = []
            request = news[prompt_index]
            if request is None:
                stream = streams[prompt_index]
                request = news[prompt_index] = responses.StreamNews(output, stream.as_deltas, stop)
                sent = request.update(output)
                if fmt.echo:  # the prompt first, once per choice
                    for index in range(n):
                        text, logprobs, offset = responses.echo_text(
                            output, texts[prompt_index], fmt, strings)
                        offsets[prompt_index, index] = offset
                        events.append(chunks.completion(
                            prompt_index * n + index, text, None, logprobs,
                            self._usage(options, request.counts, index)))
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
                events.append(chunks.completion(
                    prompt_index * n + index, text, choice.finish_reason, chunk_logprobs,
                    self._usage(options, request.counts, index, fmt.generate)))
            if events:
                yield "".join(events)
        if options.include_usage:
            yield chunks.usage(stream_usage(news, fmt.generate))

    async def _stream_chat(self, request_id: str, req, stream: Stream, stop: tuple[str, ...],
                           tool_calling: ToolCalling | None) -> AsyncIterator[str]:
        """The events of a chat stream, those of one update together."""
        chunks = responses.Chunks(request_id, req.model, int(time.time()),
                                  "chat.completion.chunk")
        options = req.stream_options or protocol.StreamOptions()
        strings = TokenStrings(self.intake.tokenizer, req.return_tokens_as_token_ids)
        news = responses.StreamNews(stream.first, stream.as_deltas, stop)
        events = [chunks.chat(index, {"role": "assistant", "content": ""}, None,
                              usage=self._usage(options, news.counts, index, counted=False))
                  for index in range(len(stream.first.outputs))]
        top = req.num_top_logprobs
        # Each choice's tool calls, read as its text grows.
        calls = {} if tool_calling is None else {
            index: tool_calling.stream() for index in range(len(stream.first.outputs))}
        async for _, output in merge([stream]):
            for choice in news.update(output):
                chunk_logprobs = (chat_logprobs(choice.logprobs, strings, top)
                                  if top is not None and choice.logprobs else None)
                delta = {"content": choice.text} if choice.text else {}
                reason = choice.finish_reason
                if calls:
                    reader = calls[choice.index]
                    delta = reader.update(choice.text, reason is not None)
                    reason = called(reason) if reader.called else reason
                if delta or reason or chunk_logprobs:
                    events.append(chunks.chat(choice.index, delta, reason, chunk_logprobs,
                                              self._usage(options, news.counts, choice.index)))
            if events:  # the role's chunks go with the first token's
                yield "".join(events)
                events = []
        if options.include_usage:
            yield chunks.usage(stream_usage([news]))


    @staticmethod
    def _usage(options: protocol.StreamOptions, counts: responses.TokenCounts, index: int,
               counted: bool = True) -> dict | None:
        """vLLM's continuous_usage_stats: each chunk carries its choice's usage so far."""
        if not options.continuous_usage_stats:
            return None
        return responses.usage_of([counts], counted, index)
