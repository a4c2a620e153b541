"""model/resolve.py: the model's config as every rank receives it (plain_config)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from pagedserve.model import random_model
from pagedserve.model.resolve import plain_config
from pagedserve.model.shape import ModelShape


def _own_config(arch: str):
    return random_model.ARCHS[arch](**random_model.config_kwargs(arch, {}))


@pytest.mark.parametrize("arch", sorted(random_model.ARCHS))
def test_the_plain_config_has_every_field_and_alias_of_the_models_own(arch):
    own = _own_config(arch)
    plain = pickle.loads(pickle.dumps(plain_config(own)))
    # use_cache is a generation setting that transformers' base class leaves out; no
    # rank reads it.
    fields = {key: value for key, value in own.to_dict().items() if key != "use_cache"}
    assert {key: plain.to_dict()[key] for key in fields} == fields
    for alias in type(own).attribute_map:
        assert getattr(plain, alias) == getattr(own, alias)
    assert ModelShape.from_config(plain) == ModelShape.from_config(own)


def test_a_rank_unpickles_it_without_importing_the_models_config_class(tmp_path):
    own = _own_config("qwen3_moe")
    blob = tmp_path / "config.pickle"
    blob.write_bytes(pickle.dumps(plain_config(own)))
    code = ("import pickle, sys; config = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(config.num_experts, sorted(m for m in sys.modules "
            "if m.startswith('transformers.models')))")
    done = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True,
                          text=True, check=True)
    assert done.stdout.split(maxsplit=1) == [str(own.num_experts), "[]\n"]
