"""The KubeRay manifest in deploy/kuberay/ is the 70B config rendered: rendering it
again gives the same file, and every value in it that the config decides is the
config's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from support import REPO

from pagedserve.cli import main
from pagedserve.cluster.app import SERVE_ENV
from pagedserve.config import load, parse

ROOT = REPO
CONFIG = ROOT / "configs" / "llama-3-70b-tp4.yaml"
MANIFEST = ROOT / "deploy" / "kuberay" / "llama-3-70b-tp4.yaml"


def _render(capsys, config: Path, *options: str) -> str:
    main(["kuberay", str(config.relative_to(ROOT)), *options])
    return capsys.readouterr().out


def test_the_shipped_manifest_is_the_config_rendered(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert _render(capsys, CONFIG) == MANIFEST.read_text(), (
        "deploy/kuberay/ is stale: run `pagedserve kuberay configs/llama-3-70b-tp4.yaml "
        "> deploy/kuberay/llama-3-70b-tp4.yaml`")


def test_the_manifest_takes_its_values_from_the_config():
    config_map, service = yaml.safe_load_all(MANIFEST.read_text())
    config = load(CONFIG)
    # The config file travels whole, and parses to the same config.
    (name, text), = config_map["data"].items()
    assert text == CONFIG.read_text() and name == CONFIG.name
    assert parse(yaml.safe_load(text)) == config
    # Serve builds the app from that file, mounted where the app's args say.
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "pagedserve.cluster.app:build_app"
    cluster = service["spec"]["rayClusterConfig"]
    (worker,) = cluster["workerGroupSpecs"]
    for group in (cluster["headGroupSpec"], worker):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(m for m in container["volumeMounts"]
                     if volumes[m["name"]].get("configMap", {}).get("name")
                     == config_map["metadata"]["name"])
        assert app["args"]["config"] == f"{mount['mountPath']}/{name}"
        # What Serve's processes read at start is in every pod's environment.
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env[k] for k in SERVE_ENV if k != "RAY_SERVE_ENABLE_DIRECT_INGRESS"} == {
            k: v for k, v in SERVE_ENV.items() if k != "RAY_SERVE_ENABLE_DIRECT_INGRESS"}
        assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"  # KubeRay's Service -> proxies
        serve_port = next(p for p in container["ports"] if p["name"] == "serve")
        assert serve_port["containerPort"] == config.serving.port
    assert serve_config["http_options"]["port"] == config.serving.port
    # A worker pod is one replica: its tensor-parallel GPUs, on one node.
    assert config.parallel.placement_strategy == "STRICT_PACK"
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(config.parallel.tensor_parallel_size)
    assert (worker["minReplicas"], worker["maxReplicas"]) == (
        config.autoscaling.min_replicas, config.autoscaling.max_replicas)
    assert cluster["enableInTreeAutoscaling"] is True


def test_a_config_whose_ranks_may_span_nodes_is_refused(tmp_path, capsys):
    data = yaml.safe_load(CONFIG.read_text())
    data["parallel"]["placement_strategy"] = "SPREAD"
    spread = tmp_path / "spread.yaml"
    spread.write_text(yaml.safe_dump(data))
    with pytest.raises(SystemExit):
        main(["kuberay", str(spread)])
    assert "placement_strategy='SPREAD'" in capsys.readouterr().err
