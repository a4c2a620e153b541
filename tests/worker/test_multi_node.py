"""Several nodes: the session's Ray cluster gets two worker nodes of one CPU each
(`ray.cluster_utils.Cluster`, each its own raylet on this machine, with a hub cache
of its own), and engines run across them.

- A TP=2 group placed STRICT_SPREAD has its ranks on two nodes, says so at start,
  and gives HF's greedy tokens.
- A model directory that a rank's node lacks fails at start with the node, the
  path and the remedy named; a hub id is resolved again on each rank's node,
  through that node's hub cache.
- weights_transfer='object_store': the engine reads the files once, and ranks
  that have no files load from the object store's copy.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import worker_nodes
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig, ModelConfig, ParallelConfig
from pagedserve.model.checkpoint_files import read_checkpoint
from pagedserve.testing import build_random_model
from pagedserve.testing.nodes import hold_cpus
from pagedserve.worker.errors import WorkerFailedError

HUB_ID = "pagedserve-tests/tiny-llama"
ENGINE = dict(block_size=8, max_model_len=128, dtype="float32", device="cpu",
              num_gpu_blocks=32)
SPREAD = dict(tensor_parallel_size=2, placement_strategy="STRICT_SPREAD", worker_cpus=0.5,
              distributed_executor_backend="ray")
PROMPTS = [[7, 8, 9, 10, 11], [100, 200, 300], list(range(20, 60))]


def _hub_cache(root: Path, model_dir: Path, revision: str = "0" * 40) -> Path:
    """A hub cache that holds `model_dir` as HUB_ID, as `snapshot_download` leaves one."""
    repo = root / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_random_model(tmp_path_factory.mktemp("multi-node") / "tiny",
                              arch="llama", num_key_value_heads=2)


@pytest.fixture(scope="module")
def nodes(cluster, ray_cluster, tiny, tmp_path_factory):
    """Two worker nodes of one CPU, each with its own hub cache holding HUB_ID."""
    caches = [_hub_cache(tmp_path_factory.mktemp(f"hub-{name}"), tiny) for name in "ab"]
    with worker_nodes(cluster, *({"num_cpus": 1, "env_vars": {
            "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}} for cache in caches)) as added:
        yield added


@pytest.fixture(scope="module")
def hf_greedy(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)
                [0, len(p):].tolist() for p in PROMPTS]


def _greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_strict_spread_puts_the_ranks_on_two_nodes_and_equals_hf(nodes, tiny, hf_greedy,
                                                                  caplog):
    with caplog.at_level(logging.WARNING, logger="pagedserve.worker.ray_executor"):
        llm = LLM(str(tiny), **ENGINE, **SPREAD)
    try:
        executor = llm.engine.executor
        assert len({node for node, _ in executor.rank_nodes}) == 2, executor.rank_nodes
        assert any("spread over 2 nodes (STRICT_SPREAD" in r.getMessage()
                   and "STRICT_PACK" in r.getMessage() for r in caplog.records), caplog.text
        assert _greedy(llm) == hf_greedy
    finally:
        llm.shutdown()


def _executor(info, **parallel):
    from pagedserve.worker.ray_executor import RayExecutor

    engine = EngineConfig(**{k: v for k, v in ENGINE.items() if k not in ("max_model_len",
                                                                          "dtype")})
    return RayExecutor(info, engine, ParallelConfig(**{**SPREAD, **parallel}), "auto")


def _resolved(tiny: Path):
    from pagedserve.model.resolve import resolve

    return resolve(ModelConfig(path=str(tiny), dtype="float32", max_model_len=128),
                   torch.device("cpu"))


@pytest.fixture
def head_taken(nodes):
    """The head's two CPUs held (no worker node has two), so that ranks of a CPU each
    go to the worker nodes."""
    from ray.util.placement_group import remove_placement_group

    group = hold_cpus(2)
    yield
    remove_placement_group(group)


def test_a_directory_missing_on_a_ranks_node_names_the_node_the_path_and_the_remedy(
        nodes, head_taken, tiny, tmp_path):
    # What the engine's node resolved, at a path the worker nodes do not have.
    elsewhere = tmp_path / "only-on-the-engine-node"
    info = dataclasses.replace(_resolved(tiny), model_dir=elsewhere)
    with pytest.raises(WorkerFailedError) as failure:
        _executor(info, worker_cpus=1.0)
    message = str(failure.value)
    assert any(node.node_id in message for node in nodes), message
    assert str(elsewhere) in message
    assert "filesystem that every node mounts" in message and "hub id" in message


def test_a_hub_id_is_resolved_on_each_ranks_node_through_its_hub_cache(nodes, head_taken,
                                                                       tiny):
    # The engine's node resolved HUB_ID to a snapshot in its own cache, a path the
    # ranks' nodes lack: each rank finds the model in its node's cache instead.
    info = dataclasses.replace(_resolved(tiny), model_dir=Path("/nonexistent/snapshot"),
                               hub_id=HUB_ID)
    executor = _executor(info, worker_cpus=1.0)
    try:
        assert {node for node, _ in executor.rank_nodes} == {n.node_id for n in nodes}
    finally:
        executor.shutdown()
    # A hub id that no node's cache holds (and no hub to reach) names the id and the node.
    with pytest.raises(WorkerFailedError, match=r"node .*could not resolve the hub id "
                                                r"'pagedserve-tests/absent'"):
        _executor(dataclasses.replace(info, hub_id="pagedserve-tests/absent"), worker_cpus=1.0)


def test_object_store_weights_give_hfs_tokens_across_nodes(nodes, tiny, hf_greedy):
    llm = LLM(str(tiny), **ENGINE, **SPREAD, weights_transfer="object_store")
    try:
        assert len({node for node, _ in llm.engine.executor.rank_nodes}) == 2
        assert _greedy(llm) == hf_greedy
    finally:
        llm.shutdown()


def test_a_rank_given_the_stored_checkpoint_reads_no_files(ray_cluster, tiny):
    """The rank's side of weights_transfer='object_store', in this process: its model
    directory does not exist, and it loads the weights from the store's copy."""
    from pagedserve.worker.rank_weights import checkpoint_for_store
    from pagedserve.worker.ray_worker import RayWorker

    info = _resolved(tiny)
    stored = [ray_cluster.put(checkpoint_for_store(info))]
    rank = RayWorker(0)
    engine = EngineConfig(**{k: v for k, v in ENGINE.items() if k not in ("max_model_len",
                                                                          "dtype")})
    nowhere = dataclasses.replace(info, model_dir=Path("/nonexistent/model"))
    threads = torch.get_num_threads()  # the rank sets its own: this process's, here
    rank.init_worker(nowhere, engine, "auto", 1, rank.rendezvous_address(), 60.0, 1.0, stored)
    try:
        loaded = dict(rank.worker.model.state_dict())
        expected = read_checkpoint(tiny)
        assert loaded["model.embed_tokens.weight"].equal(expected["model.embed_tokens.weight"])
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
