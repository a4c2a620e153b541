"""The OpenAI wire format, outbound: response and chunk shapes, logprobs, streaming deltas.

Responses are checked against the official `openai` client's own models, so a
shape the client could not read fails here rather than in a user's program.
"""

from __future__ import annotations

import json

import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoTokenizer

from pagedserve.cluster.logprobs import (
    TextOffsets,
    TokenStrings,
    chat_logprobs,
    completion_logprobs,
    sampled,
)
from pagedserve.cluster.responses import (
    Chunks,
    CompletionFormat,
    StreamState,
    chat_response,
    completion_response,
    finish_reason,
    model_list,
    usage,
)
from pagedserve.outputs import CompletionOutput, RequestOutput

CREATED = 1_700_000_000


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def choice(index, token_ids, text, finish=None, logprobs=None) -> CompletionOutput:
    return CompletionOutput(index=index, text=text, token_ids=token_ids, cumulative_logprob=-1.0,
                            logprobs=logprobs, finish_reason=finish)


def request_output(prompt_ids, choices, request_id="r", prompt_logprobs=None) -> RequestOutput:
    return RequestOutput(request_id, None, prompt_ids, choices,
                         finished=all(c.finished for c in choices),
                         prompt_logprobs=prompt_logprobs)


# ---------------------------------------------------------------------------- responses


def test_finish_reason_mapping():
    assert [finish_reason(r) for r in (None, "stop", "length", "abort")] == \
        [None, "stop", "length", "abort"]
    with pytest.raises(ValueError):
        finish_reason("eos")


def test_completion_response_two_prompts_n2(tokenizer):
    outputs = [
        request_output([1, 2, 3], [choice(1, [5, 6], "b", "length"), choice(0, [5], "a", "stop")]),
        request_output([1, 2], [choice(0, [7, 8, 9], "c", "stop"), choice(1, [7], "d", "length")]),
    ]
    response = completion_response("cmpl-1", "tiny", CREATED, outputs, ["p", "q"], tokenizer,
                                   CompletionFormat())
    assert [(c["index"], c["text"], c["finish_reason"]) for c in response["choices"]] == [
        (0, "a", "stop"), (1, "b", "length"), (2, "c", "stop"), (3, "d", "length")]
    assert all(c["logprobs"] is None for c in response["choices"])
    assert response["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert (response["id"], response["object"], response["model"], response["created"]) == (
        "cmpl-1", "text_completion", "tiny", CREATED)
    Completion.model_validate(response)


def test_completion_legacy_logprobs(tokenizer):
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    a, b = ids[0], ids[1]
    # logprobs=1: each step holds the sampled token first, then the most likely one.
    entries = [{a: -0.5}, {b: -float("inf"), a: -0.1}]
    output = request_output([0], [choice(0, [a, b], "x", "length", entries)])
    response = completion_response("c", "m", CREATED, [output], ["p"], tokenizer,
                                   CompletionFormat(logprobs=1))
    logprobs = response["choices"][0]["logprobs"]
    text_a, text_b = tokenizer.decode([a]), tokenizer.decode([b])
    assert logprobs["tokens"] == [text_a, text_b]
    assert logprobs["token_logprobs"] == [-0.5, -9999.0]  # -inf is not JSON
    # The sampled token is always included, then up to `logprobs` alternatives.
    assert logprobs["top_logprobs"] == [{text_a: -0.5}, {text_b: -9999.0, text_a: -0.1}]
    assert logprobs["text_offset"] == [0, len(text_a)]
    json.dumps(response, allow_nan=False)
    Completion.model_validate(response)
    offsets = TextOffsets(tokenizer, start=10)
    offsets.take(a)
    shifted = completion_logprobs(sampled(entries[1:]), TokenStrings(tokenizer), offsets)
    assert shifted["text_offset"] == [10 + len(text_a)]
    assert shifted["top_logprobs"] == [{text_b: -9999.0, text_a: -0.1}]


def test_echo_puts_the_prompt_first_in_text_and_logprobs(tokenizer):
    prompt_text = "The cat sat"
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    out_id = tokenizer.encode(" down", add_special_tokens=False)[0]
    # The prompt's first token has no logprob; each later one holds itself first.
    prompt_lps = [None] + [{t: -1.0 - i, 7: -0.5} for i, t in enumerate(prompt_ids[1:])]
    output = request_output(prompt_ids, [choice(0, [out_id], " down", "length",
                                                [{out_id: -0.25}])], prompt_logprobs=prompt_lps)
    fmt = CompletionFormat(logprobs=1, echo=True)
    (only,) = completion_response("c", "m", CREATED, [output], [prompt_text], tokenizer,
                                  fmt)["choices"]
    assert only["text"] == prompt_text + " down"
    lps = only["logprobs"]
    assert len(lps["tokens"]) == len(prompt_ids) + 1
    assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert lps["token_logprobs"][1:] == [-1.0 - i for i in range(len(prompt_ids) - 1)] + [-0.25]
    assert all(top for top in lps["top_logprobs"][1:])  # lm-eval reads every one after the first
    # Offsets index the echoed text: each token's text starts where it says.
    for token, offset in zip(lps["tokens"], lps["text_offset"], strict=True):
        assert only["text"][offset:offset + len(token)] == token
    # max_tokens 0: the prompt alone, nothing generated or billed.
    alone = completion_response("c", "m", CREATED, [output], [prompt_text], tokenizer,
                                CompletionFormat(logprobs=1, echo=True, generate=False))
    assert alone["choices"][0]["text"] == prompt_text
    assert len(alone["choices"][0]["logprobs"]["tokens"]) == len(prompt_ids)
    assert alone["usage"]["completion_tokens"] == 0
    # (Not checked against the openai client's Completion model: it types the
    # prompt's first logprob, null in OpenAI's own echo responses, as a number.)


def test_offsets_and_bytes_of_partial_utf8_tokens(tokenizer):
    """Byte-level tokens may each hold part of a character: their bytes are their own,
    and each offset is where the token's share of the text starts."""
    text = "caf\u00e9 \U0001f680 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    strings = TokenStrings(tokenizer)
    assert any(strings.text(t) == "\ufffd" for t in ids)  # the test needs partial tokens
    assert b"".join(bytes(strings.bytes(t)) for t in ids) == text.encode("utf-8")
    entries = [{t: -1.0} for t in ids]
    chat = chat_logprobs(entries, strings, top_logprobs=0)
    assert b"".join(bytes(item["bytes"]) for item in chat["content"]) == text.encode("utf-8")
    offsets = completion_logprobs(sampled(entries), strings, TextOffsets(tokenizer))["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(text)
    # Tokens whose text is whole start exactly where the text has it.
    for token, offset in zip(ids, offsets, strict=True):
        piece = strings.text(token)
        if "\ufffd" not in piece:
            assert text[offset:offset + len(piece)] == piece


def test_chat_response_with_top_logprobs(tokenizer):
    sampled, best, second = 40, 41, 42
    entries = [{sampled: -2.0, best: -0.2, second: -0.9}]  # sampled outside the top 2
    output = request_output([1, 2, 3, 4], [choice(0, [sampled], "x", "stop", entries)])
    response = chat_response("chatcmpl-1", "m", CREATED, output, tokenizer, top_logprobs=2)
    (only,) = response["choices"]
    assert only["message"] == {"role": "assistant", "content": "x"}
    assert only["finish_reason"] == "stop" and response["object"] == "chat.completion"
    (token,) = only["logprobs"]["content"]
    text = tokenizer.decode([sampled])
    assert (token["token"], token["logprob"], token["bytes"]) == (text, -2.0,
                                                                  list(text.encode()))
    assert [t["token"] for t in token["top_logprobs"]] == [tokenizer.decode([best]),
                                                           tokenizer.decode([second])]
    assert [t["logprob"] for t in token["top_logprobs"]] == [-0.2, -0.9]
    assert response["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    ChatCompletion.model_validate(response)
    plain = chat_response("c", "m", CREATED, output, tokenizer, top_logprobs=None)
    assert plain["choices"][0]["logprobs"] is None
    zero = chat_response("c", "m", CREATED, output, tokenizer, top_logprobs=0)
    assert zero["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_chat_response_n2_usage(tokenizer):
    output = request_output([1, 2], [choice(1, [3, 4, 5], "y", "length"),
                                     choice(0, [3], "x", "stop")])
    response = chat_response("c", "m", CREATED, output, tokenizer, top_logprobs=None)
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert response["usage"]["completion_tokens"] == 4 and response["usage"]["total_tokens"] == 6


def _event(event: str) -> dict:
    """One server-sent event's JSON."""
    assert event.startswith("data: ") and event.endswith("\n\n") and event.count("\n") == 2
    return json.loads(event.removeprefix("data: "))


def test_a_chunk_is_the_json_of_its_fields_whatever_the_text():
    """Chunks writes its JSON by hand: every value must come out as json.dumps would."""
    texts = ["", "plain", 'quote " and \\ backslash', "new\nline\ttab\r", "é ü 中文 😀",
             "\u2028\u0000", "</script>"]
    chat, completions = (Chunks('id "x"', "m\\odel", CREATED, name)
                         for name in ("chat.completion.chunk", "text_completion"))
    head = {"id": 'id "x"', "created": CREATED, "model": "m\\odel"}
    logprobs = {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": []}]}
    use = usage(2, 1)
    for text in texts:
        for reason in (None, "stop", "length"):
            assert _event(completions.completion(1, text, reason)) == {
                **head, "object": "text_completion",
                "choices": [{"index": 1, "text": text, "logprobs": None, "finish_reason": reason}]}
            for delta in ({"content": text}, {"role": "assistant", "content": text}, {}):
                assert _event(chat.chat(0, delta, reason, logprobs, use)) == {
                    **head, "object": "chat.completion.chunk", "usage": use,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": reason}]}


def test_chunks_and_lists_match_the_openai_client():
    chat = Chunks("c", "m", CREATED, "chat.completion.chunk")
    first = _event(chat.chat(0, {"role": "assistant", "content": ""}, None))
    last = _event(chat.chat(0, {}, "stop"))
    for chunk in (first, last):
        assert chunk["object"] == "chat.completion.chunk"
        ChatCompletionChunk.model_validate(chunk)
    completions = Chunks("c", "m", CREATED, "text_completion")
    text = _event(completions.completion(3, "lo", None))
    assert text == {"id": "c", "object": "text_completion", "created": CREATED, "model": "m",
                    "choices": [{"index": 3, "text": "lo", "logprobs": None,
                                 "finish_reason": None}]}
    # The client's Completion type omits the null finish_reason of a stream's chunks.
    Completion.model_validate(_event(completions.completion(3, "", "stop")))
    final = _event(chat.usage(usage(3, 4)))
    assert final["choices"] == [] and final["usage"]["total_tokens"] == 7
    assert ChatCompletionChunk.model_validate(final).usage.completion_tokens == 4
    models = model_list(["tiny", "small"], CREATED, root="/models/tiny", max_model_len=2048)
    assert models["object"] == "list"
    assert [Model.model_validate(m).id for m in models["data"]] == ["tiny", "small"]
    card = models["data"][0]
    assert card["root"] == "/models/tiny" and card["max_model_len"] == 2048


# ---------------------------------------------------------------------------- streaming


def test_stream_state_deltas_over_three_steps():
    state = StreamState()
    lp = [{5: -0.1}, {6: -0.2}, {7: -0.3}, {8: -0.4}]
    step1 = request_output([1], [choice(0, [5], "He", logprobs=lp[:1]),
                                 choice(1, [5], "", logprobs=lp[:1])])
    step2 = request_output([1], [choice(0, [5, 6], "Hello", logprobs=lp[:2]),
                                 choice(1, [5, 6], "Hi", "stop", lp[:2])])
    step3 = request_output([1], [choice(0, [5, 6, 7], "Hello!", "length", lp[:3]),
                                 choice(1, [5, 6], "Hi", "stop", lp[:2])])
    assert state.deltas(step1) == [(0, "He", lp[:1], None), (1, "", lp[:1], None)]
    assert state.deltas(step2) == [(0, "llo", lp[1:2], None), (1, "Hi", lp[1:2], "stop")]
    assert state.deltas(step3) == [(0, "!", lp[2:3], "length")]  # choice 1 is done
    assert state.deltas(step3) == []


def test_stream_state_without_logprobs_skips_empty_updates():
    state = StreamState()
    assert state.deltas(request_output([1], [choice(0, [5], "")])) == []
    assert state.deltas(request_output([1], [choice(0, [5, 6], "ab")])) == [(0, "ab", None, None)]
    assert state.deltas(request_output([1], [choice(0, [5, 6, 7], "ab", "abort")])) == [
        (0, "", None, "abort")]


def test_stream_state_holds_back_a_possible_stop_string():
    # The engine cuts "###" off once it completes: "ab#" must not be sent as it arrives.
    state = StreamState(stop=["###"])
    assert state.deltas(request_output([1], [choice(0, [5], "ab#")])) == [(0, "a", None, None)]
    assert state.deltas(request_output([1], [choice(0, [5, 6], "ab##")])) == [(0, "b", None, None)]
    assert state.deltas(request_output([1], [choice(0, [5, 6, 7], "ab", "stop")])) == [
        (0, "", None, "stop")]


def test_stream_texts_add_up_to_the_final_text():
    final = "The quick brown fox"
    state = StreamState(stop=["STOP"])
    sent = ""
    for end in range(1, len(final) + 1):
        done = end == len(final)
        out = request_output([1], [choice(0, list(range(end)), final[:end],
                                          "length" if done else None)])
        sent += "".join(text for _, text, _, _ in state.deltas(out))
    assert sent == final


def test_stream_news_of_deltas_matches_the_news_of_their_sum():
    """Deltas pass through StreamNews as they are: what it sends (text, token ids,
    logprobs, finish reasons, usage) is what cutting their running sum sends."""
    import random

    from pagedserve.cluster.responses import StreamNews, TokenCounts
    from pagedserve.engine.output_kinds import Accumulator, DeltaTracker

    rng = random.Random(0)
    for _ in range(50):
        tracker, total = DeltaTracker(["xy"]), Accumulator([1, 2])
        steps, texts, tokens, logprobs = rng.randint(1, 8), ["", ""], [[], []], [[], []]
        deltas = []
        for step in range(steps):
            choices = []
            for index in range(2):
                if rng.random() < 0.7 or step == steps - 1:
                    tokens[index].append(rng.randint(3, 9))
                    logprobs[index].append({tokens[index][-1]: -0.5})
                    texts[index] += rng.choice(["", "a", "x", "yz"])
                choices.append(choice(index, list(tokens[index]), texts[index],
                                      "length" if step == steps - 1 else None,
                                      list(logprobs[index]) if index == 0 else None))
            deltas.append(tracker.delta(request_output([1, 2], choices)))
        news, cut = StreamNews(deltas[0], True, ()), StreamState()
        token_sent: dict[int, int] = {}
        for delta in deltas:
            summed = total.add(delta)
            expected = []
            for index, text, entries, finish in cut.deltas(summed):
                ids = {c.index: c for c in summed.outputs}[index].token_ids
                expected.append((index, text, ids[token_sent.get(index, 0):], bool(entries),
                                 entries or None, finish))
                token_sent[index] = len(ids)
            assert [(c.index, c.text, c.token_ids, bool(c.logprobs), c.logprobs or None,
                     c.finish_reason) for c in news.update(delta)] == expected
            assert news.counts == TokenCounts.of(summed)
