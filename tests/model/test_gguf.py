"""GGUF files as models: weights dequantized at load, config and tokenizer from metadata.

Each file is written from a random HF model (pagedserve.testing.gguf_model) and
read back two ways: by pagedserve, and by transformers' own GGUF loader, the
oracle. Both dequantize with the `gguf` package, so the weights must be equal
exactly and greedy tokens too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.config import parse
from pagedserve.model.gguf_file import metadata_dir
from pagedserve.testing import build_random_model
from pagedserve.testing.gguf_model import rewrite_gguf, write_gguf
from pagedserve.worker.distributed import TPGroup
from pagedserve.worker.layers.linear import dense_parameters
from pagedserve.worker.models import build_model

# GQA (2 KV heads of 4), so q and k are un-permuted with different head counts.
LLAMA = dict(arch="llama", num_key_value_heads=2)
PROMPTS = [[7, 8, 9, 10, 11], [100, 200, 300, 40, 50, 60, 70], list(range(20, 60))]
ENGINE = dict(device="cpu", dtype="float32", num_gpu_blocks=64, max_model_len=128)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("gguf") / "llama", **LLAMA)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("gguf-files")
    made = {}

    def get(tensor_type: str, model_dir=None, name: str = "llama"):
        key = (tensor_type, name)
        if key not in made:
            made[key] = write_gguf(model_dir or llama_dir, root / f"{name}-{tensor_type}.gguf",
                                   tensor_type)
        return made[key]

    return get


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def _hf_greedy(model, max_tokens: int = 8) -> list[list[int]]:
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=max_tokens,
                               do_sample=False)[0, len(p):].tolist() for p in PROMPTS]


def _greedy(llm: LLM, max_tokens: int = 8) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _unfused(model) -> dict[str, torch.Tensor]:
    """Our parameters under HF's names: fused q/k/v and gate/up split back."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    split = {"qkv_proj": (["q_proj", "k_proj", "v_proj"], [q, kv, kv]),
             "gate_up_proj": (["gate_proj", "up_proj"], [config.intermediate_size] * 2)}
    out = {}
    for name, param in dense_parameters(model).items():
        fused = next((f for f in split if f".{f}." in name), None)
        if fused is None:
            out[name] = param
            continue
        parts, sizes = split[fused]
        for part, piece in zip(parts, param.split(sizes, dim=0), strict=True):
            out[name.replace(fused, part)] = piece
    return out


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_1"])
def test_weights_and_greedy_tokens_equal_transformers(gguf_files, tensor_type):
    path = gguf_files(tensor_type)
    hf = _hf(path)
    llm = LLM(str(path), **ENGINE)
    ours = _unfused(llm.engine.executor.worker.model)
    theirs = dict(hf.named_parameters())
    assert set(ours) == set(theirs)
    for name, param in theirs.items():
        assert torch.equal(ours[name], param), name
    assert _greedy(llm) == _hf_greedy(hf)


def test_the_reader_reads_what_ggufs_own_reader_reads(gguf_files, embedded_gguf):
    """gguf_file's reader overrides GGUFReader's field reads (a faster view of the map):
    every field, its parts and every tensor are what the gguf package's reader gives,
    for written files and the embedded default's."""
    from gguf import GGUFReader

    from pagedserve.model.gguf_file import _reader

    for path in (gguf_files("F32"), gguf_files("Q4_1"), embedded_gguf):
        ours, theirs = _reader(path), GGUFReader(path)
        assert list(ours.fields) == list(theirs.fields)
        for name, field in theirs.fields.items():
            mine = ours.fields[name]
            assert (mine.types, mine.data, mine.offset) == (field.types, field.data, field.offset)
            for a, b in zip(mine.parts, field.parts, strict=True):
                assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for a, b in zip(ours.tensors, theirs.tensors, strict=True):
            assert (a.tensor_type, list(a.shape), a.data_offset) == (
                b.tensor_type, list(b.shape), b.data_offset)
            assert np.array_equal(a.data, b.data), a.name


def test_qwen2_file_is_read_without_the_llama_permutation(tmp_path, gguf_files):
    # Qwen2 has q/k/v biases: they load too.
    qwen = build_random_model(tmp_path / "qwen2", arch="qwen2", num_key_value_heads=2)
    path = gguf_files("Q8_0", qwen, name="qwen2")
    hf = _hf(path)
    assert _greedy(LLM(str(path), **ENGINE)) == _hf_greedy(hf)


@pytest.mark.parametrize("arch, options", [
    ("qwen3", dict(num_key_value_heads=2)),  # q/k norms; head_dim 32, not hidden / heads
    # 8 experts of 64 features, stacked per part; top-k renormalized, as llama.cpp's
    # qwen3moe always does (and transformers reads such a file).
    ("qwen3_moe", dict(num_key_value_heads=2, norm_topk_prob=True)),
])
def test_qwen3_files_equal_their_source_model(tmp_path, gguf_files, arch, options):
    """transformers' GGUF reader skips the head width and the experts' width these files
    carry, so its model is not the oracle here: the HF model the file was written from
    is, with F32 tensors (exact) and Q8_0 ones (the file's own dequantized weights)."""
    source = build_random_model(tmp_path / arch, arch=arch, **options)
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    llm = LLM(str(gguf_files("F32", source, name=arch)), **ENGINE)
    # The source's generation config ends at two tokens, the file's metadata at one.
    params = SamplingParams(temperature=0.0, max_tokens=8,
                            stop_token_ids=list(hf.generation_config.eos_token_id))
    ours = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]
    assert ours == _hf_greedy(hf)
    model = llm.engine.executor.worker.model
    config = model.config
    assert (config.head_dim, getattr(config, "moe_intermediate_size", 64)) == (32, 64)
    quantized = LLM(str(gguf_files("Q8_0", source, name=arch)), **ENGINE)
    assert len(_greedy(quantized)[0]) == 8  # serves; its weights are checked elementwise below
    if arch == "qwen3_moe":
        from pagedserve.testing.gguf_model import dequantized

        experts = quantized.engine.executor.worker.model.model.layers[0].mlp.experts
        gate = dequantized(gguf_files("Q8_0", source, name=arch), "blk.0.ffn_gate_exps.weight")
        torch.testing.assert_close(experts.dense_weights()["w13"][:, :64], gate, rtol=0, atol=0)


def test_a_gemma3_file_equals_its_source_model(tmp_path, gguf_files):
    """A Gemma 3 file as llama.cpp writes one: norms stored plus one, the 5:1 local:global
    pattern, the global layers' linear rotary scaling under `rope.scaling.*`, no softmax
    scale. Its weights, config and greedy tokens equal the HF model it was written from
    (transformers' GGUF reader drops the scale and the scaling, so it is no oracle here)."""
    source = build_random_model(
        tmp_path / "gemma3", arch="gemma3", num_hidden_layers=6, layer_types=None,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    llm = LLM(str(gguf_files("F32", source, name="gemma3")), **ENGINE)
    model = llm.engine.executor.worker.model
    config = model.config
    assert config.layer_types == hf.config.layer_types  # five local, then one global
    assert config.query_pre_attn_scalar == hf.config.query_pre_attn_scalar == 16
    assert config.rope_parameters == hf.config.rope_parameters
    ours = dense_parameters(model)
    for name, param in hf.named_parameters():
        if name.endswith("norm.weight"):  # stored as 1 + weight
            torch.testing.assert_close(ours[name], param, rtol=0, atol=1e-6)
    # The 40-token prompt runs past the window of 24.
    assert _greedy(llm) == _hf_greedy(hf)


def test_config_tokenizer_and_template_come_from_the_metadata(gguf_files, llama_dir):
    from transformers import AutoTokenizer

    path = gguf_files("Q8_0")
    llm = LLM(str(path), **{**ENGINE, "max_model_len": None})
    original = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer = llm.get_tokenizer()
    assert llm.engine.info.hf_config.num_key_value_heads == 2
    assert llm.engine.info.max_model_len == 1024  # the file's context_length
    assert llm.engine.info.eos_token_ids == {original.eos_token_id}
    assert tokenizer.chat_template == original.chat_template
    conversation = [{"role": "user", "content": "hello there"}]
    assert (tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            == original.apply_chat_template(conversation, add_generation_prompt=True,
                                            tokenize=False))
    # Made once: a second engine finds the same metadata directory.
    assert metadata_dir(path) == llm.engine.info.model_dir


def test_each_rank_dequantizes_its_own_slice(gguf_files):
    """Ranks built in this process (no process group): their shards, side by side,
    are the TP=1 model's parameters."""
    path = gguf_files("Q4_1")
    config = LLM(str(path), **ENGINE).engine.info.hf_config

    def build(rank: int, size: int):
        return dict(build_model(config, None, max_position=128, dtype=torch.float32,
                                device=torch.device("cpu"), load_format="gguf",
                                tp=TPGroup(rank, size), gguf_file=path,
                                pack_cpu_weights=False).named_parameters())

    whole = build(0, 1)
    shards = [build(rank, 2) for rank in range(2)]
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    # Each rank holds half of q's heads, then half of k's and of v's.
    for part, (start, size) in enumerate([(0, q), (q, kv), (q + kv, kv)]):
        full = whole[qkv][start:start + size]
        sizes = [q // 2, kv // 2, kv // 2]
        offset = sum(sizes[:part])
        for rank, shard in enumerate(shards):
            piece = shard[qkv][offset:offset + sizes[part]]
            assert torch.equal(piece, full[rank * sizes[part]:(rank + 1) * sizes[part]])
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(torch.cat([s[down] for s in shards], dim=1), whole[down])


def test_tensor_parallel_ranks_load_from_the_file(ray_cluster, gguf_files):
    path = gguf_files("Q8_0")
    config = parse({"model": {"path": str(path), "dtype": "float32", "max_model_len": 128},
                    "engine": {"device": "cpu", "num_gpu_blocks": 64},
                    "parallel": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray",
                                 "worker_cpus": 0.25}})
    llm = LLM(config=config)
    try:
        assert _greedy(llm) == _hf_greedy(_hf(path))
    finally:
        llm.shutdown()


def _rewrite(path, out, arch: str | None = None, retype: str | None = None):
    """A copy of a GGUF file under another architecture name, or with its second tensor
    stored as `retype` (F64)."""
    import gguf

    reader_tensors = [t.name for t in gguf.GGUFReader(path).tensors]

    def retyped(tensor):
        if retype is None or tensor.name != reader_tensors[1]:
            return None
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64), None

    return rewrite_gguf(path, out, retyped, arch=arch)


def test_unsupported_architecture_is_refused_by_name(tmp_path, gguf_files):
    path = _rewrite(gguf_files("F32"), tmp_path / "phi.gguf", arch="phi2")
    with pytest.raises(ValueError, match=r"GGUF architecture 'phi2' is not supported "
                                         r"\(supported: llama, qwen2, qwen3, qwen3moe, gemma3\)"):
        LLM(str(path), **ENGINE)


def test_unsupported_tensor_type_is_refused_by_name(tmp_path, gguf_files):
    path = _rewrite(gguf_files("F32"), tmp_path / "f64.gguf", retype="F64")
    with pytest.raises(ValueError,
                       match=r"GGUF tensor types not supported: F64 \(token_embd\.weight\)"):
        LLM(str(path), **ENGINE)


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"no such GGUF file"):
        LLM(str(tmp_path / "absent.gguf"), **ENGINE)
