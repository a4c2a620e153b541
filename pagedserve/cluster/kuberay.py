"""A KubeRay `RayService` for a config file: the same app `pagedserve serve` runs.

    pagedserve kuberay configs/llama-3-70b-tp4.yaml > deploy/kuberay/llama-3-70b-tp4.yaml

Everything that follows from the config is read from it, never written twice:
- the config file itself goes into a ConfigMap, verbatim, and Serve's app
  builder (`build_app`) reads it from there on the head pod;
- a worker pod is one replica's node: `tensor_parallel_size` GPUs, so that a
  STRICT_PACK group fits in one pod (TP within a node, replicas across nodes);
- the worker group scales between the config's min and max replicas, with
  KubeRay's in-tree autoscaler adding pods as Serve's autoscaler asks for
  replicas (KV-cache pressure, cluster/autoscaling.py);
- every pod's environment holds what Serve's processes need (app.serve_env),
  since Serve reads it when a node's processes start;
- the Serve port and the metrics port are the config's and Ray's.

KubeRay's serve Service sends traffic to the Serve proxy of each pod on the
serve port, so the manifest runs Serve's proxy there: direct ingress
(`serving.direct_ingress`) is for load balancers that are given the ingress
replicas' own addresses (app.http_targets), which KubeRay's Service is not.

What a config does not say (the image, and the pods' CPUs and memory) comes
from the command line, with defaults sized for one 8-GPU-class node's share.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pagedserve.cluster.app import serve_env
from pagedserve.config import Config

METRICS_PORT = 8080  # Ray's Prometheus endpoint on every node (--metrics-export-port)
CONFIG_MOUNT = "/etc/pagedserve"
HF_CACHE = "/data/hf"  # each node's hub cache: a hub id is resolved on every node


def ray_service(config: Config, config_file: Path, image: str, ray_version: str,
                worker_cpus: int = 32, worker_memory: str = "320Gi") -> list[dict[str, Any]]:
    """The ConfigMap and the RayService for `config` (read from `config_file`)."""
    name = _name(config_file.stem)
    parallel, scaling, serving = config.parallel, config.autoscaling, config.serving
    if parallel.tp_may_span_nodes():
        raise ValueError(f"parallel.placement_strategy={parallel.placement_strategy!r}: a "
                         "worker pod holds one replica's GPUs, so its ranks must stay on one "
                         "node; use STRICT_PACK")
    gpus = parallel.tensor_parallel_size if config.engine.device != "cpu" else 0
    proxied = config.model_copy(update={
        "serving": serving.model_copy(update={"direct_ingress": False})})
    env = [{"name": key, "value": value} for key, value in sorted(serve_env(proxied).items())]
    env += [{"name": "HF_HOME", "value": HF_CACHE},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": "hf-token", "key": "token", "optional": True}}}]
    mounts = [{"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
              {"name": "hf-cache", "mountPath": HF_CACHE},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "config", "configMap": {"name": f"{name}-config"}},
               {"name": "hf-cache", "emptyDir": {}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    ports = [{"name": "serve", "containerPort": serving.port},
             {"name": "metrics", "containerPort": METRICS_PORT}]

    def container(role: str, resources: dict[str, Any], extra_ports=()) -> dict[str, Any]:
        return {"name": f"ray-{role}", "image": image, "env": env, "volumeMounts": mounts,
                "ports": [*extra_ports, *ports], "resources": resources}

    head_ports = [{"name": "gcs", "containerPort": 6379},
                  {"name": "dashboard", "containerPort": 8265},
                  {"name": "client", "containerPort": 10001}]
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": serving.port},
        "applications": [{
            "name": name, "route_prefix": "/",
            "import_path": "pagedserve.cluster.app:build_app",
            "args": {"config": f"{CONFIG_MOUNT}/{config_file.name}"}}],
    }
    head_resources = {"limits": {"cpu": "8", "memory": "32Gi"},
                      "requests": {"cpu": "8", "memory": "32Gi"}}
    worker_limits = {"cpu": str(worker_cpus), "memory": worker_memory}
    if gpus:
        worker_limits["nvidia.com/gpu"] = str(gpus)
    service = {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray_version,
                "enableInTreeAutoscaling": scaling.min_replicas != scaling.max_replicas,
                "headGroupSpec": {
                    # The head runs Serve's controller and proxy, no replica: no GPU.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": {"spec": {
                        "containers": [container("head", head_resources, head_ports)],
                        "volumes": volumes}},
                },
                "workerGroupSpecs": [{
                    "groupName": f"tp{parallel.tensor_parallel_size}",
                    "replicas": scaling.initial_replicas or scaling.min_replicas,
                    "minReplicas": scaling.min_replicas,
                    "maxReplicas": scaling.max_replicas,
                    "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
                    "template": {"spec": {
                        "containers": [container("worker", {"limits": worker_limits,
                                                            "requests": worker_limits})],
                        "volumes": volumes}},
                }],
            },
        },
    }
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{name}-config"},
                  "data": {config_file.name: config_file.read_text()}}
    return [config_map, service]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the config file, Serve's config) as literal blocks, and no
    anchors where one list is used twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(documents: list[dict[str, Any]], source: str) -> str:
    """The documents as one YAML stream, headed by how they were made."""
    header = (f"# Rendered from {source} by `pagedserve kuberay`:\n"
              "# edit the config and render again rather than editing this file.\n")
    return header + yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=100)


def _name(stem: str) -> str:
    """A Kubernetes name (DNS-1035 label) from a config file's name."""
    name = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"pagedserve-{name}".strip("-")
    return name[:63].rstrip("-")
