"""The embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF), against HF transformers
loading the same file: greedy tokens, beam search, prompt logprobs, the chat template,
and a real answer. One engine and one HF model for the module, in float32.
"""

from __future__ import annotations

import pytest
import torch
from conftest import user_cache
from support.accuracy import prompt_scores
from support.eagle import build_eagle_head
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve import LLM, SamplingParams
from pagedserve.model.gguf_file import metadata_dir

PLAIN = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a",
         "The three primary colors are", "Water boils at a temperature of"]
QUESTIONS = ["What is the capital of France?", "Name three fruits.",
             "Write a haiku about the sea.", "How many legs does a spider have?",
             "What is 12 times 12?"]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def llm(embedded_gguf):
    with user_cache():
        return LLM(str(embedded_gguf), device="cpu", dtype="float32", max_model_len=1024,
                   kv_cache_memory_gb=0.1)


@pytest.fixture(scope="module")
def hf(embedded_gguf):
    return AutoModelForCausalLM.from_pretrained(embedded_gguf.parent, gguf_file=embedded_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(embedded_gguf):
    return AutoTokenizer.from_pretrained(embedded_gguf.parent, gguf_file=embedded_gguf.name)


@pytest.fixture(scope="module")
def prompts(hf_tokenizer) -> list[list[int]]:
    """Five plain prompts and five chat-templated questions, tokenized by HF's own
    tokenizer from the file."""
    chats = [hf_tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=False) for q in QUESTIONS]
    return [hf_tokenizer(p).input_ids for p in PLAIN] + [list(ids) for ids in chats]


def _hf_generate(hf, prompt: list[int], **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(torch.tensor([prompt]), do_sample=False, pad_token_id=2, **kwargs)


def test_greedy_tokens_equal_transformers(llm, hf, prompts):
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected = _hf_generate(hf, prompt, max_new_tokens=MAX_TOKENS)[0, len(prompt):].tolist()
        eos = next((i + 1 for i, t in enumerate(expected) if t == 2), len(expected))
        assert output.outputs[0].token_ids == expected[:eos], llm.get_tokenizer().decode(prompt)


def test_beam_search_equals_transformers(llm, hf, prompts):
    prompt = prompts[len(PLAIN)]  # the first chat prompt
    params = SamplingParams(n=2, best_of=4, use_beam_search=True, temperature=0.0,
                            max_tokens=12, early_stopping=False)
    (output,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    rows = _hf_generate(hf, prompt, num_beams=4, num_return_sequences=2, max_new_tokens=12,
                        early_stopping=False, length_penalty=1.0)[:, len(prompt):].tolist()
    expected = [row[:next((i + 1 for i, t in enumerate(row) if t == 2), len(row))]
                for row in rows]
    assert [c.token_ids for c in output.outputs] == expected


def test_prompt_logprobs_equal_transformers(llm, hf, prompts):
    prompt = prompts[len(PLAIN) + 2]
    (output,) = llm.generate([{"prompt_token_ids": prompt}],
                             SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2),
                             use_tqdm=False)
    with torch.inference_mode():
        reference = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    assert output.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        assert output.prompt_logprobs[i][prompt[i]] == pytest.approx(
            reference[i - 1, prompt[i]].item(), abs=2e-4)


def test_the_file_is_served_quantized_within_the_accuracy_bounds(llm, hf, prompts):
    """Its Q4_1 linear weights and Q8_0 embedding (tied to the LM head) stay quantized;
    over every position of the ten prompts, prompt logprobs are within 0.02 (mean
    absolute) of transformers' on the dequantized file, and the top token agrees at
    >= 97% of them (float32 sums in another order are all that differ)."""
    from pagedserve.worker.layers.quantized import quantized_of

    model = llm.engine.executor.worker.model
    assert sum(quantized_of(p) is not None for p in model.parameters()) == 30 * 4 + 1
    float_bytes = sum(p.numel() * 4 for p in hf.parameters())
    assert llm.get_memory_stats()["weight_bytes"] < float_bytes / 4
    mean_difference, top1 = prompt_scores(llm, hf, prompts)
    assert mean_difference <= 0.02 and top1 >= 0.97, (mean_difference, top1)


def test_chat_applies_the_models_template_and_answers(llm, hf_tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    (output,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert output.prompt_token_ids == list(hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert llm.get_tokenizer().decode(output.prompt_token_ids).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"  # <|im_end|> ends the turn


def test_model_config_comes_from_the_file(llm):
    info = llm.engine.info
    config = info.hf_config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings and info.eos_token_ids == {2}
    assert info.dtype == torch.float32 and info.gguf_file is not None


SPECULATED = SamplingParams(temperature=0.0, max_tokens=48)


@pytest.fixture(scope="module")
def plain_greedy(llm, prompts) -> list[list[int]]:
    """The plain engine's greedy tokens, which every speculative run must give."""
    inputs = [{"prompt_token_ids": p} for p in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(inputs, SPECULATED, use_tqdm=False)]


@pytest.mark.parametrize("speculative", ["ngram", "draft_model", "eagle"])
def test_speculative_decoding_keeps_the_greedy_tokens(plain_greedy, embedded_gguf, prompts,
                                                      speculative, tmp_path):
    """Prompt lookup, the model as its own draft, and a random EAGLE head in the published
    layout (no trained one exists for this model): every token is the plain engine's
    (itself HF's, above), and the drafts are used."""
    config = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2}
    if speculative == "draft_model":
        config = {"model": str(embedded_gguf), "num_speculative_tokens": 3}
    elif speculative == "eagle":
        with user_cache():
            target_dir = metadata_dir(embedded_gguf)
        head = build_eagle_head(tmp_path / "eagle", target_dir, "eagle", seed=1)
        config = {"method": "eagle", "model": str(head), "num_speculative_tokens": 2}
    with user_cache():
        spec = LLM(str(embedded_gguf), device="cpu", dtype="float32", max_model_len=1024,
                   kv_cache_memory_gb=0.1, speculative_config=config)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    ours = [o.outputs[0].token_ids for o in spec.generate(inputs, SPECULATED, use_tqdm=False)]
    assert ours == plain_greedy
    stats = spec.get_spec_decode_stats()
    assert stats["draft_tokens"] > 0, stats
    assert stats["accepted_tokens"] > 0 or speculative == "eagle", stats
    if speculative == "draft_model":
        assert stats["acceptance_rate"] > 0.9, stats
