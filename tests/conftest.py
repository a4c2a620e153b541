"""Shared fixtures: small random-weight HF models, built once per test session."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

# Triton kernels run in Triton's interpreter on this CPU. Triton reads this when a
# kernel is decorated, so it is set before anything imports pagedserve.kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
# A model's own code (trust_remote_code tests) is copied here, not into the user's cache.
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="pagedserve-hf-modules-"))

import pytest

from pagedserve.testing import build_random_model

# Tiny variants of each supported architecture (defaults: hidden 64, 2 layers, 4 heads).
MODEL_VARIANTS = {
    "llama": dict(arch="llama"),
    "llama-gqa": dict(arch="llama", num_key_value_heads=1),  # 4 query heads per KV head
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "llama3-rope": dict(arch="llama", num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}),
    # A window of 24 on every layer, and on layer 1 of 2 only (layer_types).
    "mistral-window": dict(arch="mistral", sliding_window=24),
    "qwen2-window": dict(arch="qwen2", use_sliding_window=True, sliding_window=24,
                         max_window_layers=1),
    "qwen3": dict(arch="qwen3"),
    # Interleaved local (window 24) and global layers, the global rotary scaled as
    # Gemma 3's 4B and larger models scale it.
    "gemma3": dict(arch="gemma3", rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "mixtral": dict(arch="mixtral"),  # 4 experts, top 2, every layer sparse
    # 8 experts, top 2 without renormalizing; layer 1 of 3 dense (mlp_only_layers).
    "qwen3-moe": dict(arch="qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1],
                      norm_topk_prob=False),
}


# The embedded default model, which `make test` fetches into the user's cache
# before the suite runs (`pagedserve fetch`); read there, not fetched again.
USER_CACHE = os.environ.get("PAGEDSERVE_CACHE_DIR") or os.path.expanduser("~/.cache/pagedserve")


@contextlib.contextmanager
def user_cache():
    """PAGEDSERVE_CACHE_DIR set to the user's cache while the real model is resolved."""
    previous = os.environ.get("PAGEDSERVE_CACHE_DIR")
    os.environ["PAGEDSERVE_CACHE_DIR"] = USER_CACHE
    try:
        yield
    finally:
        os.environ["PAGEDSERVE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def embedded_gguf():
    """The embedded default's GGUF file (fetched if `make test` did not) and its metadata."""
    from pagedserve.model import embedded
    from pagedserve.model.gguf_file import metadata_dir

    with user_cache():
        path = embedded.fetch(embedded.DEFAULT)
        metadata_dir(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Models the engine builds on first use go to a per-session cache, not the user's."""
    previous = os.environ.get("PAGEDSERVE_CACHE_DIR")
    os.environ["PAGEDSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("PAGEDSERVE_CACHE_DIR", None)
    else:
        os.environ["PAGEDSERVE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """name -> directory, built lazily so a test file pays only for what it uses."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            spec = dict(MODEL_VARIANTS[name])
            built[name] = build_random_model(root / name, **spec)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_llama(model_dirs):
    return model_dirs("llama")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ray reads these when its processes start: metrics and autoscaling stats every
# half second instead of every 10 s, so the tests see them within their bounds.
_RAY_PORTS: dict[str, int] = {}
# Serve's log records are written one at a time, not in batches of 1000, so a
# test reading the log files sees them at once.
FAST_RAY_ENV = {"RAY_metrics_report_interval_ms": "500",
                    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"}


@pytest.fixture(scope="session")
def cluster():
    """The session's Ray cluster (`ray.cluster_utils.Cluster`): a head node of two CPUs,
    to which the multi-node tests add worker nodes, each its own raylet on this machine.
    Starting one takes seconds, so there is one for the whole session."""
    from ray.cluster_utils import Cluster

    from pagedserve.cluster.app import serve_environment

    serve_environment()  # the serving tests run Serve as `pagedserve serve` does
    for name, value in FAST_RAY_ENV.items():
        os.environ.setdefault(name, value)
    _RAY_PORTS["metrics"] = free_port()
    local = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "metrics_export_port": _RAY_PORTS["metrics"]})
    yield local
    local.shutdown()


@contextlib.contextmanager
def worker_nodes(cluster, *options: dict):
    """Worker nodes added to the session's cluster, one per dict of `add_node` options.
    At the end those still there are removed, and the cluster is back to the CPUs it
    had, so that later tests see the cluster they expect."""
    import ray

    before = ray.cluster_resources().get("CPU", 0)
    added = [cluster.add_node(**node_options) for node_options in options]
    cluster.wait_for_nodes()
    try:
        yield added
    finally:
        for node in added:
            if node in cluster.worker_nodes:
                cluster.remove_node(node)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("CPU", 0) != before and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_cluster(cluster):
    """This process connected to the session's Ray cluster."""
    import ray

    ray.init(address=cluster.address, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_metrics_url(ray_cluster) -> str:
    """Ray's Prometheus endpoint, where ray.util.metrics land."""
    return f"http://127.0.0.1:{_RAY_PORTS['metrics']}/metrics"


class ServePorts(NamedTuple):
    http: int
    grpc: int


def direct_url(app_name: str) -> str:
    """Where an app's ingress replica answers HTTP itself (Serve's direct ingress)."""
    from pagedserve.cluster.app import http_targets

    deadline = time.monotonic() + 60
    while not (targets := http_targets(app_name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    (_, port), = targets  # one ingress replica
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def serve_instance(ray_cluster):
    """Ray Serve with its HTTP and gRPC proxies, for every serving test.

    Serve takes proxy options only when it first starts in a Ray session, so it
    starts here, once; each test module runs its app on it under its own name, or
    uses an app it shares with others (`shared_app`).
    """
    import ray.serve._private.client as serve_client
    from ray import serve
    from ray.serve.config import gRPCOptions

    from pagedserve.cluster.app import GRPC_SERVICER_FUNCTIONS

    # serve.run and serve.delete look at the app's status once a second; the tests
    # start and stop some twenty apps, so they look ten times a second.
    serve_client.CLIENT_POLLING_INTERVAL_S = 0.1
    ports = ServePorts(http=free_port(), grpc=free_port())
    # One proxy, on the head: the multi-node tests' nodes share this machine's ports,
    # where a proxy on each would take the same one.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": ports.http},
                grpc_options=gRPCOptions(port=ports.grpc,
                                         grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS)))
    yield ports
    serve.shutdown()


# The app that the modules which only send requests share: tiny-cpu.yaml as
# `served_tiny_cpu` gives it, under this name (gRPC's `application` metadata) and
# route prefix, behind this API key.
SERVED_TINY_CPU = "shared-tiny-cpu"
SERVED_API_KEY = "test-key"


def served_tiny_cpu():
    """tiny-cpu.yaml with an API key, a small body limit and half a CPU for its worker:
    the one config of the modules that share an app (`shared_app`)."""
    from pagedserve.config import load, parse

    data = load(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml").model_dump()
    data["serving"].update(api_key=SERVED_API_KEY, max_request_bytes=64 * 1024)
    data["parallel"].update(worker_cpus=0.5)
    return parse(data)


class SharedApp(NamedTuple):
    direct: str  # its ingress replica's own address, route prefix included
    proxy: str  # the same through Serve's HTTP proxy
    ports: ServePorts


# name -> (its config, the app): the shared apps running now.
_shared_apps: dict[str, tuple[str, SharedApp]] = {}
# The test modules that use them.
_sharing_modules: set[Path] = set()


def _stop_shared_apps() -> None:
    from ray import serve

    for name in list(_shared_apps):
        serve.delete(name)
        del _shared_apps[name]


@pytest.fixture(scope="session")
def shared_app(serve_instance):
    """(name, config) -> a `SharedApp`: the Serve app of that name and route prefix,
    started on first use.

    Starting an app takes seconds, so the modules that serve the same config share
    one: they run one after another, and the app is stopped after the last of them
    (`pytest_collection_modifyitems`, `pytest_runtest_teardown`), so that no other
    module finds it holding CPUs. Only for modules that send requests: none may
    change the app (its config, its replicas) or depend on what it served before.
    """
    from ray import serve

    from pagedserve.cluster.app import build

    def get(name: str, config) -> SharedApp:
        key = config.model_dump_json()
        if name not in _shared_apps:
            serve.run(build(config), name=name, route_prefix=f"/{name}")
            _shared_apps[name] = key, SharedApp(f"{direct_url(name)}/{name}",
                                                f"http://127.0.0.1:{serve_instance.http}/{name}",
                                                serve_instance)
        started, app = _shared_apps[name]
        assert started == key, f"app {name} is shared by modules with different configs"
        return app

    yield get
    _stop_shared_apps()


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marker
def pytest_collection_modifyitems(items):
    """Tests that use the Ray cluster are marked `serial`: `make test` runs the others
    in two processes first, then these in one, on one cluster (pyproject.toml's markers).

    The modules that use `shared_app` run one after another, where the first of
    them would have run; the others keep their order."""
    for item in items:
        if "cluster" in item.fixturenames:  # the closure: ray_cluster, serve_instance, ...
            item.add_marker(pytest.mark.serial)
    _sharing_modules.update(item.path for item in items if "shared_app" in item.fixturenames)
    if _sharing_modules:
        first = next(i for i, item in enumerate(items) if item.path in _sharing_modules)
        rest = [item for item in items if item.path not in _sharing_modules]
        items[:] = (rest[:first] + [item for item in items if item.path in _sharing_modules]
                    + rest[first:])


def pytest_runtest_teardown(item, nextitem):
    """After the last module that uses `shared_app`, its apps stop (at the session's
    end, the fixture stops them)."""
    if _shared_apps and nextitem is not None and nextitem.path not in _sharing_modules:
        _stop_shared_apps()
