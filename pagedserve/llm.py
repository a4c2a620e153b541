"""The offline engine: `LLM(model=...).generate(prompts, sampling_params)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from pagedserve import config as config_module
from pagedserve.chat_template import load_chat_template, render_chat
from pagedserve.config import Config, config_from_fields
from pagedserve.engine.core import EngineCore, PromptInput
from pagedserve.errors import RequestError
from pagedserve.lora_request import LoRARequest
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """An in-process engine over one model (vLLM-compatible arguments).

    `model` is a Hugging Face directory, a hub id or a GGUF file. The keyword
    arguments are the fields of the model, engine and parallel sections of
    `pagedserve.config` (the one home of their defaults), by name; invalid
    values raise `ValueError` naming the field, the value and the limit.
    """

    def __init__(self, model: str | None = None, *, config: Config | None = None,
                 **fields: Any) -> None:
        if config is None:
            config = config_from_fields(model, fields, source="LLM arguments")
        elif model is not None or fields:
            raise ValueError("LLM takes either config= or the model and its fields, not both")
        self.config = config
        self.engine = EngineCore.from_config(config)
        self._request_ids = itertools.count()

    @property
    def llm_engine(self) -> EngineCore:
        """The engine, by vLLM's name (also `engine`): `llm.llm_engine.scheduler`
        has `waiting_queue_size`, and its `block_manager` the pool's
        `num_total_blocks`, `num_allocated_blocks` and `num_free_blocks`."""
        return self.engine

    @classmethod
    def from_config(cls, path: str) -> LLM:
        """Build from a YAML config file (see configs/)."""
        return cls(config=config_module.load(path))

    def shutdown(self) -> None:
        """Stop the engine's workers (with Ray: its actors and placement group)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_memory_stats(self) -> dict[str, float | int]:
        return self.engine.get_memory_stats()

    def get_step_stats(self) -> dict[str, float | int]:
        """steps, device_s, wall_s and host_s (the wall time the device waited for
        the host) of the steps so far; see EngineCore.get_step_stats."""
        return self.engine.get_step_stats()

    def get_spec_decode_stats(self) -> dict[str, float]:
        """Speculative decoding so far (EngineCore.get_spec_decode_stats)."""
        return self.engine.get_spec_decode_stats()

    def generate(self, prompts: PromptInput | Seq[PromptInput],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        `lora_request`: one adapter for every prompt, or one per prompt (None: the
        base model); the engine must be built with enable_lora=True.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"sampling_params has {len(sampling_params)} entries for "
                             f"{len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_request = [lora_request] * len(prompts)
        if len(lora_request) != len(prompts):
            raise RequestError("lora_request", f"lora_request has {len(lora_request)} entries "
                                               f"for {len(prompts)} prompts")
        requests = [(self.engine.prompt_token_ids(p), p if isinstance(p, str) else None)
                    for p in prompts]
        # Only the final outputs are returned, so the engine builds no others (as vLLM's LLM).
        final_only = {id(p): dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                      for p in sampling_params}
        sampling_params = [final_only[id(p)] for p in sampling_params]
        order = []
        try:
            for (token_ids, text), params, lora in zip(requests, sampling_params, lora_request,
                                                       strict=True):
                request_id = str(next(self._request_ids))
                self.engine.add_request(request_id, token_ids, params, prompt=text,
                                        lora_request=lora)
                order.append(request_id)
            return self._run(order, use_tqdm)
        finally:
            for request_id in order:  # on any error, leave no request (or block) behind
                self.engine.abort_request(request_id)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True,
             lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
             chat_template: str | None = None,
             tools: list[dict] | None = None,
             ) -> list[RequestOutput]:
        """Generate replies to conversations, rendered with a chat template.

        `chat_template` (a file or a Jinja string) overrides, for this call, the
        configured model.chat_template, which overrides the tokenizer's own.
        `tools` (OpenAI's function tools) reach the template, as in vLLM's
        LLM.chat; reading calls out of the replies is the server's (tool_choice).
        """
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer; this LLM was built with "
                             "skip_tokenizer_init=True")
        template = (self.config.model.chat_template if chat_template is None
                    else load_chat_template(chat_template))
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": render_chat(tokenizer, conversation, template,
                                                    add_generation_prompt=True, tools=tools)}
                   for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="Generating", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[request_id] for request_id in order]
