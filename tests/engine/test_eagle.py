"""Speculative decoding with EAGLE heads (engine.speculative, methods "eagle" and
"eagle3"), in their published checkpoint layouts.

No trained head exists for the tests' models, so each head is random and held
to a dense reference (tests/support/eagle.py): at every step that proposes,
the paged head's proposals are the reference's, drafted from HF transformers'
hidden states of the same sequence. The greedy tokens are the target's own.

For the EAGLE head to be kept often, so that the rows of kept drafts are fed
too, the target is made to predict from its newest token alone (its attention
writes nothing), and the head mostly copies it: fc takes the embedding, with a
little of the target's feature, and the head's attention adds a little.
"""

from __future__ import annotations

import pytest
import torch
from conftest import user_cache
from safetensors.torch import load_file, save_file
from support import REPO
from support.eagle import ReferenceDrafter, build_eagle_head

from pagedserve import LLM, SamplingParams
from pagedserve.config import config_from_fields, load, parse
from pagedserve.engine.speculation import draft_model
from pagedserve.model.resolve import resolve
from pagedserve.scheduler.speculation import SpeculationPolicy
from pagedserve.testing import build_random_model
from pagedserve.worker.eagle_draft import EagleDrafter

ENGINE = dict(device="cpu", dtype="float32", num_gpu_blocks=96, max_model_len=384, block_size=8)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11] * 4, [40 + i % 13 for i in range(30)]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("eagle")


@pytest.fixture(scope="module")
def copying(tmp):
    """A one-layer target whose next token depends on its newest token alone, and an
    EAGLE head that nearly copies it."""
    target = build_random_model(tmp / "copying", arch="llama", num_hidden_layers=1)
    weights = load_file(target / "model.safetensors")
    weights["model.layers.0.self_attn.o_proj.weight"].zero_()
    weights["model.norm.weight"].fill_(1.0)  # the head's LM head reads no norm
    save_file(weights, target / "model.safetensors")
    head = build_eagle_head(tmp / "copying-eagle", target, "eagle", seed=1)
    tensors = load_file(head / "model.safetensors")
    hidden = tensors["fc.weight"].shape[0]
    tensors["fc.weight"] = torch.cat([torch.eye(hidden), 0.005 * tensors["fc.weight"][:, hidden:]],
                                     dim=1)
    for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm"):
        tensors[f"layers.0.{name}.weight"] = weights[f"model.layers.0.{name}.weight"]
    tensors["layers.0.self_attn.o_proj.weight"] *= 0.05
    save_file(tensors, head / "model.safetensors")
    return target, head


@pytest.fixture(scope="module")
def deep(tmp):
    """A four-layer target (an EAGLE-3 head reads the inputs of its layers 2, 2 and 1)
    and a random EAGLE-3 head with its own embedding and a vocabulary of 128 tokens."""
    target = build_random_model(tmp / "deep", arch="llama", num_hidden_layers=4,
                                num_key_value_heads=2)
    head = build_eagle_head(tmp / "deep-eagle3", target, "eagle3", seed=2, own_embedding=True,
                            draft_vocab_size=128)
    return target, head


def _spy(monkeypatch) -> list[tuple[int, list[int]]]:
    """Each proposal the head makes: (the sequence's length then, its newest token
    included, which the head read in its last row; the proposals)."""
    events: list[tuple[int, list[int]]] = []
    propose = EagleDrafter._proposals

    def spy(self, step, asking, out, nexts, kv_caches):
        proposals = propose(self, step, asking, out, nexts, kv_caches)
        events.extend((seq.context_len + 1, proposals[seq.seq_id]) for seq in asking)
        return proposals

    monkeypatch.setattr(EagleDrafter, "_proposals", spy)
    return events


def _checked_against_the_reference(events, sequence, method, head, target) -> int:
    """Each proposal made within `sequence` equals the dense reference's; how many."""
    reference = ReferenceDrafter(method, head, target)
    checked = 0
    for length, proposals in events:
        if length <= len(sequence):
            assert proposals == reference.propose(sequence[:length], len(proposals)), length
            checked += 1
    return checked


def _check(method, target, head, engine, monkeypatch) -> dict:
    events = _spy(monkeypatch)
    spec = LLM(str(target), **{**ENGINE, **engine}, speculative_config={
        "method": method, "model": str(head), "num_speculative_tokens": 3})
    plain = LLM(str(target), **ENGINE)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    ours = spec.generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    theirs = plain.generate(prompts[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert ours == theirs
    assert _checked_against_the_reference(events, PROMPTS[0] + ours, method, head, target) >= 5
    # Both prompts at once, the second beside the first: tokens still the target's.
    assert ([o.outputs[0].token_ids for o in spec.generate(prompts, GREEDY, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)])
    if "num_gpu_blocks" in engine:
        assert spec.engine.scheduler.num_preemptions > 0
    stats = spec.engine.stats()
    assert stats.free_blocks == stats.total_blocks, "blocks leaked"
    return spec.get_spec_decode_stats()


@pytest.mark.parametrize("engine", [
    {},
    {"max_num_batched_tokens": 12, "async_scheduling": True},  # prompts in chunks
    {"num_gpu_blocks": 10, "max_model_len": 64, "preemption_mode": "swap"},
    {"num_gpu_blocks": 10, "max_model_len": 64, "preemption_mode": "recompute",
     "async_scheduling": True},
], ids=["default", "chunked-async", "swap", "recompute-async"])
def test_an_eagle_heads_proposals_are_the_references_and_mostly_kept(copying, engine,
                                                                      monkeypatch):
    stats = _check("eagle", *copying, engine, monkeypatch)
    assert stats["acceptance_rate"] > 0.5, stats


def test_an_eagle3_heads_proposals_are_the_references(deep, monkeypatch):
    stats = _check("eagle3", *deep, {"max_num_batched_tokens": 12}, monkeypatch)
    assert stats["draft_tokens"] > 0


def _eagle(head) -> dict:
    return {"method": "eagle", "model": str(head), "num_speculative_tokens": 3}


def test_a_prefix_cache_hit_brings_the_heads_rows_with_its_blocks(copying, monkeypatch):
    """A prompt that is the first run's prompt and output hits the blocks that run
    cached, those of its prompt and of its decoding, and the head's rows come with
    them: its proposals after the hit are still the reference's, and mostly kept. Every
    step speculates (on this CPU the policy soon finds plain steps faster)."""
    monkeypatch.setattr(SpeculationPolicy, "num_drafts",
                        lambda self, decodes, context, stats: self.proposer.k)
    target, head = copying
    spec = LLM(str(target), **ENGINE, speculative_config=_eagle(head))
    first = spec.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY,
                          use_tqdm=False)[0].outputs[0].token_ids
    hits, before = spec.engine.block_manager.prefix_hit_tokens, spec.get_spec_decode_stats()
    events = _spy(monkeypatch)
    prompt = PROMPTS[0] + first[:20]
    second = spec.generate([{"prompt_token_ids": prompt}], GREEDY,
                           use_tqdm=False)[0].outputs[0].token_ids
    assert second == LLM(str(target), **ENGINE).generate(
        [{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    # Every full block before the prompt's last token (computed again for its logits):
    # blocks of the first run's prompt, and of its decoding (positions 28 to 39).
    assert spec.engine.block_manager.prefix_hit_tokens - hits == (len(prompt) - 1) // 8 * 8 == 40
    assert _checked_against_the_reference(events, prompt + second, "eagle", head, target) >= 5
    after = spec.get_spec_decode_stats()
    kept = after["accepted_tokens"] - before["accepted_tokens"]
    assert kept > 0.5 * (after["draft_tokens"] - before["draft_tokens"]), (before, after)
    stats = spec.engine.stats()
    assert stats.free_blocks == stats.total_blocks, "blocks leaked"


def test_an_adapters_requests_draft_from_the_adapted_targets_features(copying, tmp,
                                                                       monkeypatch):
    """The head reads the features of the target with the request's adapter: its
    proposals are the reference's drafted from the adapter merged into the target (peft),
    and the adapted target verifies, so the tokens are the adapter's own."""
    import peft
    from transformers import AutoModelForCausalLM

    from pagedserve import LoRARequest
    from pagedserve.testing.lora import build_lora_adapter

    target, head = copying
    adapter_dir = build_lora_adapter(target, tmp / "adapter", 8,
                                     ["gate_proj", "up_proj", "down_proj"])
    merged = tmp / "adapted"
    peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32), str(adapter_dir)
    ).merge_and_unload().save_pretrained(merged)
    adapter = LoRARequest("mlp", 1, str(adapter_dir))
    lora = dict(enable_lora=True, max_lora_rank=8, max_loras=1)
    events = _spy(monkeypatch)
    spec = LLM(str(target), **ENGINE, **lora, speculative_config=_eagle(head))
    base = LLM(str(target), **ENGINE, **lora)
    prompt = [{"prompt_token_ids": PROMPTS[0]}]

    def tokens(llm, **adapted) -> list[int]:
        return llm.generate(prompt, GREEDY, use_tqdm=False, **adapted)[0].outputs[0].token_ids

    adapted = tokens(spec, lora_request=adapter)
    assert adapted == tokens(base, lora_request=adapter)
    assert adapted != tokens(base)  # the adapter changes the tokens
    assert _checked_against_the_reference(events, PROMPTS[0] + adapted, "eagle", head,
                                          merged) >= 5
    assert spec.get_spec_decode_stats()["accepted_tokens"] > 0
    stats = spec.engine.stats()
    assert stats.free_blocks == stats.total_blocks, "blocks leaked"


def test_a_head_that_cannot_run_is_refused_at_start_with_the_reason(deep, copying, tmp):
    target, head = deep

    def refusal(path=target, method="eagle3", model=head, **fields) -> str:
        config = config_from_fields(str(path), {"device": "cpu", **fields, "speculative_config": {
            "method": method, "model": str(model), "num_speculative_tokens": 2}}, source="test")
        info = resolve(config.model, torch.device("cpu"))
        with pytest.raises(ValueError, match="engine.speculative") as raised:
            draft_model(config, info)
        return str(raised.value)

    assert "tensor_parallel_size=4 does not divide the model's num_key_value_heads=2" in refusal(
        tensor_parallel_size=4, distributed_executor_backend="ray")  # 2 KV heads
    gemma = build_random_model(tmp / "gemma3", arch="gemma3")
    assert "reads a Llama-family decoder's hidden states" in refusal(gemma)
    wider = build_random_model(tmp / "wider", arch="llama", hidden_size=96,
                               num_hidden_layers=4)
    assert "hidden states of 64 values and the target's have 96" in refusal(wider)
    other = build_random_model(tmp / "other-vocab", arch="llama", vocab_size=300,
                               num_hidden_layers=4)
    assert "a vocabulary of 512 tokens and the target 300" in refusal(other)
    assert "reads the inputs of layers [2, 0, -2]" in refusal(copying[0])
    with user_cache(), pytest.raises(ValueError, match="no hidden states for an EAGLE head"):
        sim = load(REPO / "configs" / "llama-3-8b-h200-sim.yaml").model_dump()
        sim["engine"]["speculative"] = {"method": "eagle", "model": str(copying[1]),
                                        "num_speculative_tokens": 2}
        LLM(config=parse(sim))


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_tensor_parallel_ranks_draft_with_the_head_split_like_the_target(
        ray_cluster, copying, deep, method, monkeypatch):
    """TP=2 on Ray: each rank runs its shard of the head over its shard of the blocks.
    The proposals that reach the engine are the dense reference's, and the nearly
    copying EAGLE head is still mostly kept (a rank drafting from the wrong rows,
    tokens or KV would be neither)."""
    import pagedserve.scheduler.scheduler as scheduler_module

    events: list[tuple[list[int], list[int]]] = []  # (the sequence then, its proposals)
    keep = scheduler_module.keep_proposals

    def spy(seq, proposals):
        if proposals:
            events.append((list(seq.token_ids), list(proposals)))
        keep(seq, proposals)

    monkeypatch.setattr(scheduler_module, "keep_proposals", spy)
    target, head = copying if method == "eagle" else deep
    config = parse({"model": {"path": str(target), "dtype": "float32", "max_model_len": 384},
                    "engine": {"device": "cpu", "num_gpu_blocks": 96, "block_size": 8,
                               "speculative": {"method": method, "model": str(head),
                                               "num_speculative_tokens": 3}},
                    "parallel": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray",
                                 "worker_cpus": 0.25}})
    tp2, plain = LLM(config=config), LLM(str(target), **ENGINE)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    try:
        assert ([o.outputs[0].token_ids for o in tp2.generate(prompts, GREEDY, use_tqdm=False)]
                == [o.outputs[0].token_ids
                    for o in plain.generate(prompts, GREEDY, use_tqdm=False)])
        reference = ReferenceDrafter(method, head, target)
        assert len(events) >= 5
        for tokens, proposals in events:
            assert proposals == reference.propose(tokens, len(proposals)), len(tokens)
        stats = tp2.get_spec_decode_stats()
        assert stats["draft_tokens"] > 0
        if method == "eagle":
            assert stats["acceptance_rate"] > 0.5, stats
        engine_stats = tp2.engine.stats()
        assert engine_stats.free_blocks == engine_stats.total_blocks, "blocks leaked"
    finally:
        tp2.shutdown()
