"""The gRPC API (proto/pagedserve.proto), served by the ingress deployment.

    client ──gRPC──> Serve's gRPC proxy ──"Generate" / "GenerateStream"──> OpenAIIngress
                     (the app named in the `application` metadata)   ──> GenerationService

Serve's gRPC proxy calls the ingress deployment's methods named like the RPCs,
with the request message and, as they take a `grpc_context` argument, a
RayServegRPCContext: the call's metadata, and the status to answer with. The
ingress hands each call to a GenerationService, which takes the request in
through the ingress's RequestIntake (cluster/intake.py) with the steps of POST
/v1/completions (the same field rules in protocol.CompletionRequest, model
check, tokenizer, context limit, engine submission), so the two APIs accept
and refuse alike.

A refusal sets its code and details on `grpc_context`. `Generate` then returns
an empty reply: Serve sends the context back with it, and the proxy answers
with that status instead (the reply is dropped). A stream that yields nothing
never sends its context back, so `GenerateStream` raises instead: Serve
carries a code set before an exception to the proxy too (as gRPCStatusError),
at the price of a logged traceback.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from ray.serve.grpc_util import RayServegRPCContext

from pagedserve.cluster import protocol, responses
from pagedserve.cluster.errors import OpenAIError
from pagedserve.cluster.parsing import validate_request
from pagedserve.cluster.proto import pagedserve_pb2 as pb
from pagedserve.cluster.streams import Stream, last

if TYPE_CHECKING:  # the intake loads transformers; this module is read without it
    from pagedserve.cluster.intake import RequestIntake

# The HTTP statuses of protocol's errors, as gRPC codes.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: OpenAIError) -> grpc.StatusCode:
    """The gRPC code for what the HTTP API answers with `error.status_code`."""
    # Overloaded: a 503 with Retry-After and no code (a dead engine or replica has one).
    if "Retry-After" in error.headers and error.code is None:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return _CODES.get(error.status_code, grpc.StatusCode.UNKNOWN)


class RequestRefused(Exception):
    """Raised after the status is set on the grpc_context; Serve answers with that status."""


def _set_status(context: RayServegRPCContext, error: OpenAIError) -> None:
    context.set_code(status_code(error))
    context.set_details(error.message)


def _metadata(context: RayServegRPCContext, key: str) -> str:
    """A metadata value the client sent (keys arrive lower-case), or ''."""
    return next((value for name, value in context.invocation_metadata() if name == key), "")


def request_fields(request: pb.GenerateRequest) -> dict[str, Any]:
    """The fields the client set, as the JSON body of /v1/completions would hold them.

    Unset fields are left out, so CompletionRequest applies its defaults.
    """
    fields: dict[str, Any] = {}
    for field, value in request.ListFields():
        if field.name == "prompt_token_ids":
            fields["prompt"] = list(value.token_ids)
        elif field.name == "structured_outputs":
            kind = value.WhichOneof("kind")
            if kind is not None:
                spec = getattr(value, kind)
                fields[field.name] = {kind: list(spec.choices) if kind == "choice" else spec}
        elif field.name == "logit_bias":  # JSON's keys are strings
            fields[field.name] = {str(token): bias for token, bias in value.items()}
        elif field.is_repeated:
            fields[field.name] = list(value)
        else:
            fields[field.name] = value
    return fields


def _choice(index: int, text: str, token_ids: list[int],
            logprobs: list[dict[int, float]] | None, finish_reason: str | None) -> pb.Choice:
    entries = [pb.TokenLogprob(token_id=next(iter(entry)), logprob=next(iter(entry.values())),
                               top_logprobs=entry)
               for entry in logprobs or []]
    return pb.Choice(index=index, text=text, token_ids=token_ids, logprobs=entries,
                     finish_reason=responses.finish_reason(finish_reason) or "")


def _usage(counts: responses.TokenCounts) -> pb.Usage:
    usage = responses.usage_of([counts])
    return pb.Usage(prompt_tokens=usage["prompt_tokens"],
                    completion_tokens=usage["completion_tokens"])


class GenerationService:
    """The `Generation` service's calls, taken in through the ingress's RequestIntake.

    OpenAIIngress has the methods Serve's gRPC proxy calls (`Generate`,
    `GenerateStream`); they hand each call to `generate` or `generate_stream`.
    """

    def __init__(self, intake: RequestIntake) -> None:
        self.intake = intake

    async def generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> pb.GenerateReply:
        try:
            request_id, _, stream = await self._submit(request, grpc_context, stream=False)
            final = await last(stream)
        except Exception as error:  # noqa: BLE001 - every failure becomes a gRPC status
            _set_status(grpc_context, self.intake.error(error))
            return pb.GenerateReply()  # not sent: the status ends the call
        choices = [_choice(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason)
                   for c in sorted(final.outputs, key=lambda c: c.index)]
        return pb.GenerateReply(id=request_id, choices=choices,
                                usage=_usage(responses.TokenCounts.of(final)))

    async def generate_stream(self, request: pb.GenerateRequest,
                              grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateReply]:
        """One message per engine step with news: new text and tokens; usage in the last."""
        try:
            request_id, stop, stream = await self._submit(request, grpc_context, stream=True)
            news = responses.StreamNews(stream.first, stream.as_deltas, stop)
            async for output in stream:
                reply = pb.GenerateReply(id=request_id)
                for choice in news.update(output):
                    reply.choices.append(_choice(choice.index, choice.text, choice.token_ids,
                                                 choice.logprobs, choice.finish_reason))
                if output.finished:
                    reply.usage.CopyFrom(_usage(news.counts))
                if reply.choices or output.finished:
                    yield reply
        except Exception as error:  # noqa: BLE001 - every failure becomes a gRPC status
            _set_status(grpc_context, self.intake.error(error))
            raise RequestRefused(grpc_context.details()) from None

    async def _submit(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext,
                      stream: bool) -> tuple[str, tuple[str, ...], Stream]:
        """Check, tokenize and start `request` as /v1/completions does.

        Returns the request id, the stop strings and the started stream.
        """
        intake = self.intake
        intake.check_api_key(_metadata(grpc_context, "authorization"))
        fields = request_fields(request) | ({"stream": True} if stream else {})
        req = await intake.accept(validate_request(protocol.CompletionRequest, fields,
                                                   intake.bounds))
        ids = intake.prompt_ids(req.prompts()[0], req)  # the oneof holds one prompt
        params = req.sampling_params(intake.room(ids, req))
        request_id = f"gen-{uuid.uuid4().hex}"
        return request_id, params.stop, await intake.start(request_id, ids, params, req)
