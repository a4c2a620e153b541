"""Chat templates users give: model.chat_template / LLM(chat_template=...), per call,
and per HTTP request, over a model whose tokenizer has no template of its own."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from pagedserve import LLM, SamplingParams
from pagedserve.cluster.chat_protocol import ChatCompletionRequest
from pagedserve.cluster.errors import OpenAIError
from pagedserve.cluster.ingress import chat_prompt_ids
from pagedserve.cluster.parsing import parse_request
from pagedserve.config import config_from_fields, load

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
INLINE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
          "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
IN_FILE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }} "
           "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
PER_CALL = "{{ bos_token }}{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
GREEDY = SamplingParams(temperature=0.0, max_tokens=3)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_llama, tmp_path_factory):
    """The tiny model's tokenizer saved without a chat template, as a base model's is."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = None
    path = tmp_path_factory.mktemp("plain-tokenizer")
    tokenizer.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)
    assert reloaded.chat_template is None
    return path, reloaded


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "chat.jinja"
    path.write_text(IN_FILE)
    return path


def _llm(tiny_llama, tokenizer_dir, **fields) -> LLM:
    return LLM(str(tiny_llama), tokenizer=str(tokenizer_dir), block_size=8, num_gpu_blocks=32,
               max_model_len=128, device="cpu", dtype="float32", **fields)


def _expected(tokenizer, template: str, add_generation_prompt: bool = True) -> list[int]:
    return list(tokenizer.apply_chat_template(MESSAGES, chat_template=template, tokenize=True,
                                              return_dict=False,
                                              add_generation_prompt=add_generation_prompt))


@pytest.fixture(scope="module")
def llm_plain(tiny_llama, plain_tokenizer):
    return _llm(tiny_llama, plain_tokenizer[0])


@pytest.fixture(scope="module")
def llm_inline(tiny_llama, plain_tokenizer):
    return _llm(tiny_llama, plain_tokenizer[0], chat_template=INLINE)


# -- Python ------------------------------------------------------------------------------------

def test_chat_without_any_template_is_a_value_error_naming_chat_template(llm_plain):
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        llm_plain.chat(MESSAGES, GREEDY, use_tqdm=False)
    assert not llm_plain.engine.has_unfinished_requests()


def test_configured_inline_template_renders_as_transformers_does(llm_inline, plain_tokenizer):
    output, = llm_inline.chat(MESSAGES, GREEDY, use_tqdm=False)
    assert output.prompt_token_ids == _expected(plain_tokenizer[1], INLINE)
    assert len(output.outputs[0].token_ids) == 3


def test_configured_template_file_is_read(tiny_llama, plain_tokenizer, template_file):
    llm = _llm(tiny_llama, plain_tokenizer[0], chat_template=str(template_file))
    assert llm.config.model.chat_template == IN_FILE
    output, = llm.chat(MESSAGES, GREEDY, use_tqdm=False)
    assert output.prompt_token_ids == _expected(plain_tokenizer[1], IN_FILE)
    assert "[ASSISTANT]" in plain_tokenizer[1].decode(output.prompt_token_ids)


def test_per_call_template_beats_the_configured_one(llm_inline, plain_tokenizer, template_file):
    tokenizer = plain_tokenizer[1]
    inline, = llm_inline.chat(MESSAGES, GREEDY, use_tqdm=False, chat_template=PER_CALL)
    assert inline.prompt_token_ids == _expected(tokenizer, PER_CALL)
    from_file, = llm_inline.chat(MESSAGES, GREEDY, use_tqdm=False,
                                 chat_template=str(template_file))
    assert from_file.prompt_token_ids == _expected(tokenizer, IN_FILE)
    assert _expected(tokenizer, INLINE) not in (inline.prompt_token_ids,
                                                from_file.prompt_token_ids)
    with pytest.raises(ValueError, match="chat_template file 'nope.jinja' does not exist"):
        llm_inline.chat(MESSAGES, GREEDY, use_tqdm=False, chat_template="nope.jinja")


# -- config ------------------------------------------------------------------------------------

def test_config_refuses_a_missing_file_or_a_directory(tmp_path):
    missing = str(tmp_path / "missing.jinja")
    with pytest.raises(ValueError, match=r"model\.chat_template: .*does not exist"):
        config_from_fields("m", {"chat_template": missing}, source="LLM arguments")
    with pytest.raises(ValueError, match=r"model\.chat_template: .*is not a file"):
        config_from_fields("m", {"chat_template": str(tmp_path)}, source="LLM arguments")
    text_only = tmp_path / "plain.txt"
    text_only.write_text("no template here")
    with pytest.raises(ValueError, match=r"model\.chat_template: .*holds no Jinja"):
        config_from_fields("m", {"chat_template": str(text_only)}, source="LLM arguments")


def test_an_inline_template_longer_than_a_file_name_is_inline():
    long = INLINE + "{# " + "x" * 300 + "/" + "y" * 300 + " #}"
    assert config_from_fields("m", {"chat_template": long}, source="x").model.chat_template == long


def test_yaml_chat_template_file_is_read_once(tmp_path, template_file):
    path = tmp_path / "config.yaml"
    path.write_text(f"model:\n  path: m\n  chat_template: {json.dumps(str(template_file))}\n")
    config = load(path)
    assert config.model.chat_template == IN_FILE
    # The loaded text travels in the config: validated again, it stays the same.
    again = config_from_fields("m", {"chat_template": config.model.chat_template}, source="x")
    assert again.model.chat_template == IN_FILE


# -- HTTP: the ingress's rendering of a chat request -------------------------------------------

def _chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest,
                         json.dumps({"model": "m", "messages": MESSAGES, **fields}).encode())


def test_http_without_any_template_is_a_400_on_chat_template(plain_tokenizer):
    with pytest.raises(OpenAIError) as raised:
        chat_prompt_ids(plain_tokenizer[1], _chat(), configured_template=None)
    error = raised.value
    assert error.status_code == 400 and error.param == "chat_template"
    assert "chat_template" in error.body()["error"]["message"]


def test_http_request_template_beats_the_configured_one(plain_tokenizer):
    tokenizer = plain_tokenizer[1]
    assert chat_prompt_ids(tokenizer, _chat(), INLINE) == _expected(tokenizer, INLINE)
    assert (chat_prompt_ids(tokenizer, _chat(chat_template=PER_CALL), INLINE)
            == _expected(tokenizer, PER_CALL))
    assert (chat_prompt_ids(tokenizer, _chat(chat_template=INLINE, add_generation_prompt=False),
                            None) == _expected(tokenizer, INLINE, add_generation_prompt=False))


def test_http_bad_template_is_a_400_on_chat_template(plain_tokenizer):
    with pytest.raises(OpenAIError) as raised:
        chat_prompt_ids(plain_tokenizer[1], _chat(chat_template="{% for m in messages %}"), None)
    assert raised.value.status_code == 400 and raised.value.param == "chat_template"
    with pytest.raises(OpenAIError) as raised:
        _chat(chat_template="")
    assert raised.value.param == "chat_template"
