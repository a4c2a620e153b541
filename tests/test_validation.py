"""Every validation error is a ValueError whose message names the offending field."""

from __future__ import annotations

import re

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve import config as config_module
from pagedserve.sampling_params import MAX_LOGPROBS
from pagedserve.testing import build_random_model

# -- SamplingParams ---------------------------------------------------------------------------

SAMPLING_ERRORS = [
    ("n", dict(n=0)),
    ("n", dict(n=-2)),
    ("best_of", dict(n=3, best_of=2)),
    # Beam search ignores the sampling knobs (test_beam_search.py) but refuses these.
    ("repetition_penalty", dict(use_beam_search=True, best_of=2, temperature=0,
                                repetition_penalty=1.2)),
    ("stop", dict(use_beam_search=True, best_of=2, temperature=0, stop=["x"])),
    ("seed", dict(use_beam_search=True, best_of=2, temperature=0, seed=1)),
    ("early_stopping", dict(early_stopping="sometimes")),
    ("temperature", dict(temperature=-0.1)),
    ("temperature", dict(temperature=float("nan"))),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_p", dict(top_p=-0.5)),
    ("top_k", dict(top_k=-2)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.5)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("presence_penalty", dict(presence_penalty=-2.5)),
    ("frequency_penalty", dict(frequency_penalty=3.0)),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=-1.0)),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-5)),
    ("stop", dict(stop="")),
    ("stop", dict(stop=["ok", ""])),
    ("stop", dict(stop=[3])),
    ("stop_token_ids", dict(stop_token_ids=[5, -1])),
    ("logprobs", dict(logprobs=MAX_LOGPROBS + 1)),
    ("logprobs", dict(logprobs=-1)),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed=2**63)),
]


@pytest.mark.parametrize("field, kwargs", SAMPLING_ERRORS,
                         ids=[f"{f}={list(k.values())[-1]!r}" for f, k in SAMPLING_ERRORS])
def test_sampling_params_rejects(field, kwargs):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}=") as info:
        SamplingParams(**kwargs)
    value = kwargs.get(field, SamplingParams.__dataclass_fields__[field].default)
    if field == "stop":
        value = (value,) if isinstance(value, str) else tuple(value)
    elif field == "stop_token_ids":
        value = tuple(value)
    assert f"{field}={value!r}" in str(info.value)  # the message carries the value too


@pytest.mark.parametrize("kwargs", [
    dict(n=1), dict(n=3, best_of=3), dict(n=2, best_of=5),
    dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-9), dict(top_k=0), dict(top_k=1),
    dict(top_k=-1), dict(max_tokens=None),
    dict(min_p=0.0), dict(min_p=1.0),
    dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(repetition_penalty=1e-3),
    dict(max_tokens=1), dict(stop="x"), dict(stop=["a", "b"]), dict(stop_token_ids=[0]),
    dict(logprobs=0), dict(logprobs=MAX_LOGPROBS), dict(seed=0), dict(seed=2**63 - 1),
])
def test_sampling_params_accepts_boundaries(kwargs):
    SamplingParams(**kwargs)


def test_sampling_params_normalizes_inputs():
    params = SamplingParams(n=2, stop="end", stop_token_ids=[3, 4])
    assert params.best_of == 2
    assert params.stop == ("end",) and params.stop_token_ids == (3, 4)
    assert params.greedy is False and SamplingParams(temperature=0).greedy is True


# -- configuration ----------------------------------------------------------------------------

BASE = {"model": {"path": "/models/x"}}


def _cfg(model=None, engine=None, **top):
    data = {"model": {**BASE["model"], **(model or {})}, **top}
    if engine is not None:
        data["engine"] = engine
    return data


def test_config_defaults_parse():
    cfg = config_module.parse(BASE)
    assert cfg.engine.block_size == 16 and cfg.model.dtype == "auto"


def _rejects(data, *patterns, source="<dict>"):
    with pytest.raises(ValueError) as info:
        config_module.parse(data, source)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)
    return message


@pytest.mark.parametrize("block_size", [12, 3, 24, 100])
def test_config_block_size_power_of_two(block_size):
    _rejects(_cfg(engine={"block_size": block_size}), r"engine\.block_size", str(block_size))


@pytest.mark.parametrize("block_size", [0, 512])
def test_config_block_size_range(block_size):
    _rejects(_cfg(engine={"block_size": block_size}), r"engine\.block_size")


@pytest.mark.parametrize("data, path", [
    (_cfg(engine={"blok_size": 16}), r"engine\.blok_size"),
    (_cfg(model={"max_len": 5}), r"model\.max_len"),
    (_cfg(servers=2), r"servers"),
    ({"model": {"random_init": {"name": "x", "layers": 3}}}, r"model\.random_init\.layers"),
], ids=["engine", "model", "top-level", "nested"])
def test_config_unknown_key_rejected_with_its_path(data, path):
    _rejects(data, path)


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.2])
def test_config_gpu_memory_utilization(value):
    _rejects(_cfg(engine={"gpu_memory_utilization": value}), r"engine\.gpu_memory_utilization")


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8"])
def test_config_unknown_dtype(dtype):
    _rejects(_cfg(model={"dtype": dtype}), r"model\.dtype", dtype)


def test_config_both_model_sources():
    _rejects({"model": {"path": "/x", "random_init": {"name": "tiny"}}},
             r"model\.path", r"model\.random_init")


def test_config_neither_model_source():
    _rejects({"model": {"dtype": "float32"}}, r"model\.path", r"model\.random_init")


def test_config_missing_model_section():
    _rejects({"engine": {}}, r"\bmodel\b")


@pytest.mark.parametrize("key, value", [
    ("max_num_seqs", 0), ("num_gpu_blocks", 0), ("max_num_batched_tokens", -1),
    ("device", "tpu"), ("swap_space", -1.0),
    ("kv_cache_memory_gb", 0), ("attention_backend", "flash"),
])
def test_config_engine_fields(key, value):
    _rejects(_cfg(engine={key: value}), rf"engine\.{key}")


def test_config_max_model_len_positive():
    _rejects(_cfg(model={"max_model_len": 0}), r"model\.max_model_len")


def test_config_error_names_the_source():
    _rejects(_cfg(engine={"block_size": 12}), r"my\.yaml", source="my.yaml")


def test_config_load_rejects_non_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        config_module.load(path)


def test_config_load_reports_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: /x\nengine:\n  block_size: 12\n")
    with pytest.raises(ValueError, match=r"c\.yaml[\s\S]*engine\.block_size"):
        config_module.load(path)


# -- LLM-level checks (need a model) ------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_random_model(tmp_path_factory.mktemp("validation") / "m"))


def _llm(model_dir, **kwargs):
    args = dict(device="cpu", dtype="float32", block_size=16, max_model_len=64,
                num_gpu_blocks=16, max_num_seqs=4)
    args.update(kwargs)
    return LLM(model_dir, **args)


@pytest.fixture(scope="module")
def llm(model_dir):
    return _llm(model_dir)


@pytest.fixture(scope="module")
def raw_llm(model_dir):
    return _llm(model_dir, skip_tokenizer_init=True)


def _assert_clean(llm):
    stats = llm.get_memory_stats()
    assert stats["allocated_blocks"] == 0 and stats["stored_tokens"] == 0
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not llm.engine.has_unfinished_requests()


def _greedy(**kwargs):
    return SamplingParams(temperature=0.0, **kwargs)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match=r"65[\s\S]*max_model_len=64"):
        llm.generate({"prompt_token_ids": [7] * 65}, _greedy(max_tokens=1), use_tqdm=False)
    _assert_clean(llm)


def test_prompt_of_exactly_max_model_len_is_accepted(llm):
    (out,) = llm.generate({"prompt_token_ids": [7] * 64}, _greedy(max_tokens=5), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    _assert_clean(llm)


def test_pool_too_small_for_one_sequence(model_dir):
    with pytest.raises(ValueError, match="num_gpu_blocks") as info:
        _llm(model_dir, num_gpu_blocks=1, max_model_len=64, block_size=16)
    assert "max_model_len=64" in str(info.value)


def test_max_model_len_above_model_limit(model_dir):
    with pytest.raises(ValueError, match=r"max_model_len=2048[\s\S]*1024"):
        _llm(model_dir, max_model_len=2048, num_gpu_blocks=128)


@pytest.mark.parametrize("bad", [512, 100000, -1])
def test_token_id_outside_vocabulary(llm, bad):
    with pytest.raises(ValueError, match=rf"prompt_token_ids[\s\S]*{bad}[\s\S]*512"):
        llm.generate({"prompt_token_ids": [1, 2, bad]}, _greedy(max_tokens=1), use_tqdm=False)
    _assert_clean(llm)


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": []}, _greedy(max_tokens=1), use_tqdm=False)
    _assert_clean(llm)


def test_dict_prompt_without_token_ids(llm):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt": "hello"}, _greedy(max_tokens=1), use_tqdm=False)


def test_prompt_of_wrong_type(llm):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([123], _greedy(max_tokens=1), use_tqdm=False)


def test_sampling_params_count_mismatch(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [_greedy(), _greedy(), _greedy()], use_tqdm=False)
    _assert_clean(llm)


def test_best_of_above_max_num_seqs(llm):
    with pytest.raises(ValueError, match=r"best_of=5[\s\S]*max_num_seqs=4"):
        llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(n=5, max_tokens=1),
                     use_tqdm=False)
    _assert_clean(llm)


def test_request_larger_than_the_pool(model_dir):
    small = _llm(model_dir, num_gpu_blocks=4, max_model_len=64, block_size=16)
    with pytest.raises(ValueError, match=r"needs up to 8 KV blocks \(a 10-token prompt, 2 "
                                         r"sequences[\s\S]*pool's 4"):
        small.generate({"prompt_token_ids": [1] * 10}, SamplingParams(n=2, max_tokens=50),
                       use_tqdm=False)
    _assert_clean(small)


def test_string_prompt_without_tokenizer(raw_llm):
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        raw_llm.generate("hello there", _greedy(max_tokens=1), use_tqdm=False)
    _assert_clean(raw_llm)


def test_stop_strings_without_tokenizer(raw_llm):
    with pytest.raises(ValueError, match=r"stop[\s\S]*skip_tokenizer_init"):
        raw_llm.generate({"prompt_token_ids": [1, 2, 3]}, _greedy(max_tokens=2, stop=["x"]),
                         use_tqdm=False)
    _assert_clean(raw_llm)
    # Token ids and stop_token_ids still work without a tokenizer.
    (out,) = raw_llm.generate({"prompt_token_ids": [1, 2, 3]}, _greedy(max_tokens=3),
                              use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].text == ""


def test_chat_without_tokenizer(raw_llm):
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        raw_llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)


def test_unknown_dtype_via_llm(model_dir):
    with pytest.raises(ValueError, match=r"model\.dtype[\s\S]*float64"):
        _llm(model_dir, dtype="float64")


def test_block_size_not_power_of_two_via_llm(model_dir):
    with pytest.raises(ValueError, match=r"engine\.block_size[\s\S]*12"):
        _llm(model_dir, block_size=12)


def test_tensor_parallel_size_zero_via_llm(model_dir):
    with pytest.raises(ValueError, match=r"parallel\.tensor_parallel_size"):
        _llm(model_dir, tensor_parallel_size=0)


def test_engine_still_works_after_a_rejected_request(llm):
    good = {"prompt_token_ids": [1, 5, 9, 13]}
    baseline = llm.generate(good, _greedy(max_tokens=6), use_tqdm=False)[0].outputs[0].token_ids
    # The good request is added first, then the bad one is refused: both must go.
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([good, {"prompt_token_ids": [3] * 100}], _greedy(max_tokens=6),
                     use_tqdm=False)
    assert llm.get_memory_stats()["allocated_blocks"] == 0
    _assert_clean(llm)
    outs = llm.generate([good, good], _greedy(max_tokens=6), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [baseline, baseline]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    _assert_clean(llm)


def test_pool_of_exactly_one_max_length_sequence_is_enough(model_dir, llm):
    """The smallest pool the check accepts must really serve several requests (by preempting)."""
    tight = _llm(model_dir, num_gpu_blocks=4, max_model_len=16, block_size=4)
    prompts = [{"prompt_token_ids": [1 + i] * 3} for i in range(3)]  # 1 block each
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
    outs = tight.generate(prompts, params, use_tqdm=False)
    for out in outs:
        assert len(out.outputs[0].token_ids) == 13 and out.outputs[0].finish_reason == "length"
    assert tight.get_memory_stats()["num_preemptions"] > 0
    _assert_clean(tight)
    # Recomputed after preemption, greedy outputs equal those of a roomy engine.
    roomy = llm.generate(prompts, _greedy(max_tokens=13, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
