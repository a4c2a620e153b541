"""End-to-end behaviour of the offline LLM: text, stop conditions, seeds, abort, stats."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "Hello world, this is a longer prompt about the weather", "a"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), block_size=8, num_gpu_blocks=256, device="cpu", dtype="float32")


def _greedy(max_tokens=24, **kwargs):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def test_text_equals_full_decode(llm):
    tokenizer = llm.get_tokenizer()
    for output in llm.generate(PROMPTS, _greedy(), use_tqdm=False):
        completion = output.outputs[0]
        assert output.prompt_token_ids[0] == tokenizer.bos_token_id
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.finish_reason == "length" and len(completion.token_ids) == 24


def test_stop_string_is_trimmed(llm):
    full = llm.generate(PROMPTS[1], _greedy(), use_tqdm=False)[0].outputs[0]
    stop = full.text[10:13]
    cut = llm.generate(PROMPTS[1], _greedy(stop=[stop, "\x00never"]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids
    assert len(cut.token_ids) < len(full.token_ids)


def test_stop_token_ids(llm):
    full = llm.generate(PROMPTS[0], _greedy(), use_tqdm=False)[0].outputs[0]
    stop_token = full.token_ids[5]
    cut = llm.generate(PROMPTS[0], _greedy(stop_token_ids=[stop_token]),
                       use_tqdm=False)[0].outputs[0]
    end = full.token_ids.index(stop_token) + 1
    assert cut.token_ids == full.token_ids[:end]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop_token
    # The stop token is not text (vLLM's rule), special tokens kept or not, unless asked for
    # (a token of whole characters: a partial one's bytes wait for the rest).
    tokenizer = llm.get_tokenizer()
    ids = full.token_ids
    stop_token = next(token for i, token in enumerate(ids) if i and token not in ids[:i]
                      and "\ufffd" not in tokenizer.decode(ids[:i + 1]))
    for skip in (True, False):
        for include in (False, True):
            kept = llm.generate(PROMPTS[0], _greedy(
                stop_token_ids=[stop_token], skip_special_tokens=skip,
                include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
            ids = kept.token_ids if include else kept.token_ids[:-1]
            assert kept.text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_eos_stops_unless_ignored(tiny_llama, tmp_path):
    """Make a token the model really generates the EOS token, then watch it stop there."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama, model_dir)
    probe = LLM(str(model_dir), num_gpu_blocks=64, device="cpu")
    full = probe.generate(PROMPTS[0], _greedy(), use_tqdm=False)[0].outputs[0]
    eos = full.token_ids[3]
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = eos
    config_path.write_text(json.dumps(config))

    llm = LLM(str(model_dir), num_gpu_blocks=64, device="cpu")
    stopped = llm.generate(PROMPTS[0], _greedy(), use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == full.token_ids[:full.token_ids.index(eos) + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason is None
    ignored = llm.generate(PROMPTS[0], _greedy(ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert ignored.token_ids == full.token_ids and ignored.finish_reason == "length"


def test_max_model_len_ends_generation(tiny_llama):
    llm = LLM(str(tiny_llama), max_model_len=40, num_gpu_blocks=16, device="cpu")
    output = llm.generate({"prompt_token_ids": list(range(10, 40))}, _greedy(max_tokens=50),
                          use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 10
    assert output.outputs[0].finish_reason == "length"


def test_seeded_sampling_reproduces_in_any_batch(llm, tiny_llama):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=7)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate([PROMPTS[1], PROMPTS[0]], [_greedy(), params], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    # Another engine seed, a pool small enough to preempt: same tokens.
    other = LLM(str(tiny_llama), block_size=8, num_gpu_blocks=8, max_model_len=64,
                max_num_batched_tokens=16, seed=123, device="cpu")
    outs = other.generate(PROMPTS * 3, [params] * 9, use_tqdm=False)
    assert other.get_memory_stats()["num_preemptions"] > 0
    for i in (0, 3, 6):
        assert outs[i].outputs[0].token_ids == alone
    different = llm.generate(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=20, seed=8),
                             use_tqdm=False)[0].outputs[0].token_ids
    assert different != alone


def test_top_k_one_equals_greedy(llm):
    greedy = llm.generate(PROMPTS, _greedy(), use_tqdm=False)
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_tokens=24),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in top1] == [o.outputs[0].token_ids for o in greedy]


def test_best_of_returns_the_n_most_likely(llm):
    params = SamplingParams(n=2, best_of=4, temperature=1.0, max_tokens=8, seed=3)
    output = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert len(output.outputs) == 2
    cumulative = [c.cumulative_logprob for c in output.outputs]
    assert cumulative == sorted(cumulative, reverse=True)
    assert all(len(c.token_ids) == 8 for c in output.outputs)


def test_skip_tokenizer_init_without_tokenizer_files(tiny_llama, tmp_path):
    model_dir = tmp_path / "weights-only"
    model_dir.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, model_dir / name)
    llm = LLM(str(model_dir), skip_tokenizer_init=True, num_gpu_blocks=64, device="cpu")
    output = llm.generate({"prompt_token_ids": [0, 10, 11, 12]}, _greedy(max_tokens=5),
                          use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 5 and output.outputs[0].text == ""
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


def test_abort_frees_every_block(llm):
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", llm.get_tokenizer()(prompt).input_ids, _greedy(100))
    for _ in range(3):
        engine.step()
    assert engine.get_memory_stats()["allocated_blocks"] > 0
    for i in range(len(PROMPTS)):
        engine.abort_request(f"abort-{i}")
    stats = engine.get_memory_stats()
    assert stats["allocated_blocks"] == 0 and stats["free_blocks"] == stats["total_blocks"]
    assert not engine.has_unfinished_requests()


def test_memory_stats_while_running(llm):
    engine = llm.engine
    engine.add_request("stats", list(range(10, 30)), _greedy(10))
    engine.step()
    stats = engine.get_memory_stats()
    assert stats["allocated_blocks"] == 3  # 20 prompt tokens in blocks of 8
    assert stats["free_blocks"] + stats["allocated_blocks"] == stats["total_blocks"]
    assert stats["utilization"] == pytest.approx(3 / stats["total_blocks"])
    assert stats["slot_utilization"] == pytest.approx(20 / 24)
    engine.abort_request("stats")


def test_chat_uses_the_template_once(llm):
    output = llm.chat([{"role": "user", "content": "hi"}], _greedy(max_tokens=4), use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    assert output.prompt_token_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(output.prompt_token_ids).endswith("<|end_header|>\n\n")


def test_demo_runs_on_the_embedded_default_config():
    result = subprocess.run([sys.executable, "-m", "pagedserve.demo", "configs/tiny-cpu.yaml",
                             "--max-tokens", "4"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("prompt:") == 5 and "KV pool after" in result.stdout


def test_cpu_threads_leave_a_core_for_the_engine_loop(tiny_llama, caplog, monkeypatch):
    import logging

    import torch

    from pagedserve.worker import cpu_threads

    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 2)
    with caplog.at_level(logging.INFO, logger="pagedserve.worker.cpu_threads"):
        LLM(str(tiny_llama), num_gpu_blocks=64, device="cpu")
    # torch's default would be one thread per core: 2 here, 7-11x slower under load.
    assert torch.get_num_threads() == 1
    assert "1 compute threads (2 usable CPUs, one left for the engine's loop)" in caplog.text
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 8)
    LLM(str(tiny_llama), num_gpu_blocks=64, device="cpu")
    assert torch.get_num_threads() == 7
    LLM(str(tiny_llama), num_gpu_blocks=64, device="cpu", cpu_threads=3)
    assert torch.get_num_threads() == 3
    torch.set_num_threads(1)  # as the engines of other tests leave it


def test_usable_cpus_follow_affinity():
    import os

    from pagedserve.worker.cpu_threads import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_an_idle_pool_reports_no_slot_use_and_a_swap_pool_its_size(tiny_llama):
    llm = LLM(str(tiny_llama), num_gpu_blocks=64, device="cpu")
    stats = llm.get_memory_stats()
    # Nothing stored: no slot is used (not 100% of them).
    assert stats["slot_utilization"] == 0.0 and stats["mean_slot_utilization"] == 0.0
    # The CPU swap pool defaults to the KV pool's size, not 4 GiB whatever the model.
    assert stats["cpu_blocks"] == 64
    assert LLM(str(tiny_llama), num_gpu_blocks=64, device="cpu",
               swap_space=0.0001).get_memory_stats()["cpu_blocks"] < 64
