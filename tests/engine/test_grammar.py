"""Grammars for structured outputs (engine/grammar.py) on xgrammar, and their token
bitmasks applied to logits (worker/token_masks.py).

The oracle for what a grammar allows is the spec itself: walking a matcher along
a text the spec accepts (a JSON document `jsonschema` validates, a string the
regex fully matches, one of the choices) every token is allowed, and a text it
rejects is refused at its first wrong token. xgrammar's own
apply_token_bitmask_inplace is the oracle for applying masks.
"""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from pagedserve.engine.grammar import GrammarCompiler, GrammarLimits, Matcher, new_bitmask
from pagedserve.errors import RequestError
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.testing import build_random_model
from pagedserve.worker.token_masks import allowed_tokens, apply_token_bitmask_

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                          "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(build_random_model(tmp_path_factory.mktemp("grammar")
                                                            / "llama", arch="llama"))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer))
    yield compiler
    compiler.shutdown()


def _walk(compiler, tokenizer, params, text: str) -> tuple[bool, bool]:
    """(every token of `text` allowed by the mask before it and accepted, terminated
    after the EOS token)."""
    matcher = Matcher(compiler.compile(params))
    bitmask = new_bitmask(1, compiler.vocab_size)
    for token in tokenizer.encode(text, add_special_tokens=False):
        matcher.fill(bitmask, 0)
        if not allowed_tokens(bitmask, compiler.vocab_size)[0, token] or not matcher.accept(token):
            return False, False
    matcher.fill(bitmask, 0)
    eos = tokenizer.eos_token_id
    return True, bool(allowed_tokens(bitmask, compiler.vocab_size)[0, eos]) and matcher.accept(
        eos) and matcher.terminated


@pytest.mark.parametrize("params, good, bad", [
    (StructuredOutputsParams(json=SCHEMA), json.dumps({"name": "Ada", "age": 36}),
     json.dumps({"name": "Ada"})),
    (StructuredOutputsParams(json=json.dumps(SCHEMA)), json.dumps({"name": "B", "age": 1}),
     json.dumps({"name": "B", "age": "x"})),
    (StructuredOutputsParams(regex=r"[a-c]{2}-\d+"), "ab-12", "ad-1"),
    (StructuredOutputsParams(choice=["yes", "no", 'say "maybe"\n']), 'say "maybe"\n', "nope"),
    (StructuredOutputsParams(grammar='root ::= "x" root | "y"'), "xxy", "xyx"),
    (StructuredOutputsParams(json_object=True), '{"a": [1, 2]}', "[1, 2]"),
])
def test_a_text_the_spec_accepts_walks_through_and_one_it_rejects_does_not(
        compiler, tokenizer, params, good, bad):
    if params.kind == "json":
        jsonschema.validate(json.loads(good), json.loads(params.json))
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(bad), json.loads(params.json))
    if params.kind == "regex":
        assert re.fullmatch(params.regex, good) and not re.fullmatch(params.regex, bad)
    assert _walk(compiler, tokenizer, params, good) == (True, True)
    assert _walk(compiler, tokenizer, params, bad)[1] is False


@pytest.mark.parametrize("bounds", [{"maxLength": 8}, {"minLength": 1}, {}])
def test_json_strings_refuse_raw_control_characters_with_length_bounds_too(
        compiler, tokenizer, bounds):
    """JSON forbids U+0000-U+001F unescaped in strings; xgrammar's length-bounded
    strings admit them (its issue #800), which the compiler closes."""
    schema = {"type": "object", "properties": {"s": {"type": "string", **bounds}},
              "required": ["s"], "additionalProperties": False}
    params = StructuredOutputsParams(json=schema)
    assert _walk(compiler, tokenizer, params, '{"s": "a b"}') == (True, True)
    for control in "\t\x01\x1f":
        with pytest.raises(ValueError):
            json.loads(f'{{"s": "a{control}b"}}')
        assert _walk(compiler, tokenizer, params, f'{{"s": "a{control}b"}}') == (False, False)


def test_a_spec_compiles_once(compiler):
    first = compiler.submit(StructuredOutputsParams(json={"type": "integer", "minimum": 0}))
    again = compiler.submit(StructuredOutputsParams(json='{"type": "integer", "minimum": 0}'))
    assert again is first and first.result(timeout=30) is not None
    other = compiler.submit(StructuredOutputsParams(json='{"minimum": 0, "type": "integer"}'))
    assert other is not first  # another text: the order of keys is part of the spec


@pytest.mark.parametrize("params, field, words", [
    (dict(json='{"type": "object", "properties": {"a": {"type": "nope"}}}'),
     "structured_outputs.json", "does not compile"),
    (dict(regex="(ab"), "structured_outputs.regex", "does not compile"),
    (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar", "does not compile"),
])
def test_a_spec_that_does_not_compile_names_the_field_and_quotes_the_compiler(
        compiler, params, field, words):
    with pytest.raises(RequestError, match=words) as caught:
        compiler.compile(StructuredOutputsParams(**params))
    assert caught.value.param == field and len(str(caught.value)) > len(words) + 30


def test_a_spec_past_the_size_limit_is_refused_before_compiling(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), GrammarLimits(max_spec_bytes=100))
    try:
        huge = {"enum": [f"value-{i}" for i in range(50)]}
        with pytest.raises(RequestError, match=r"structured_outputs.json is \d+ bytes, past the "
                                               r"limit of 100 \(structured_outputs.max_spec_bytes"):
            compiler.submit(StructuredOutputsParams(json=huge))
    finally:
        compiler.shutdown()


def test_a_compile_past_the_time_limit_fails_its_request_only(tokenizer, monkeypatch):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), GrammarLimits(compile_timeout_s=0.2))
    slow = compiler._compile

    def stalled(params):
        if params.kind == "regex":
            time.sleep(1.0)
        return slow(params)

    monkeypatch.setattr(compiler, "_compile", stalled)
    try:
        with pytest.raises(RequestError, match=r"ran past the limit of 0.2 s"):
            compiler.compile(StructuredOutputsParams(regex="a+"))
        # The other pool thread compiles the next spec meanwhile.
        assert compiler.compile(StructuredOutputsParams(choice=["a"])) is not None
    finally:
        compiler.shutdown()


def test_a_forked_matcher_goes_its_own_way_and_rollback_undoes_tokens(compiler, tokenizer):
    matcher = Matcher(compiler.compile(StructuredOutputsParams(choice=["left", "right"])))
    fork = matcher.fork()
    for token in tokenizer.encode("left", add_special_tokens=False):
        assert matcher.accept(token)
    right = tokenizer.encode("right", add_special_tokens=False)
    assert not matcher.accept(right[0])
    assert all(fork.accept(token) for token in right)
    matcher.rollback(len(tokenizer.encode("left", add_special_tokens=False)))
    assert matcher.accept(right[0])


@pytest.mark.parametrize("vocab", [100, 96, 131])
def test_bitmask_application_equals_xgrammars(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen)
    bitmask = torch.randint(-2**31, 2**31, (5, -(-vocab // 32)), generator=gen,
                            dtype=torch.int64).to(torch.int32)
    expected = logits.clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, backend="torch_native")
    assert torch.equal(apply_token_bitmask_(logits.clone(), bitmask), expected)
    # Only some rows constrained: the others untouched.
    rows = torch.tensor([3, 1])
    got = apply_token_bitmask_(logits.clone(), bitmask[:2], rows)
    assert torch.equal(got[[0, 2, 4]], logits[[0, 2, 4]])
    assert torch.equal(got[3], _masked(logits[3], bitmask[0]))
    assert torch.equal(got[1], _masked(logits[1], bitmask[1]))


def _masked(row: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    allowed = [bool((int(words[t // 32]) >> (t % 32)) & 1) for t in range(row.shape[0])]
    return row.masked_fill(~torch.tensor(allowed), float("-inf"))


def test_a_new_bitmask_allows_everything_and_a_padded_vocabulary_is_cut():
    bitmask = new_bitmask(2, 40)
    assert bitmask.shape == (2, 2) and allowed_tokens(bitmask, 40).all()
    logits = torch.zeros(2, 70)  # a model vocabulary past the tokenizer's 40 (as padded)
    apply_token_bitmask_(logits, bitmask)
    assert torch.isinf(logits[:, 64:]).all() and not torch.isinf(logits[:, :64]).any()
