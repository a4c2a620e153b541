"""Client load against a pagedserve endpoint, for the soak and flood tests and the
reliability benchmark (benchmarks/reliability.py): `mixed_load` and `flood`.

Each client loops until the deadline over a random mix of requests: plain
completions, streamed ones, chat, n=2, and streams it leaves after a few
chunks (a client that disconnects). Every request ends in exactly one outcome:

    ok        200 with exactly max_tokens tokens per choice (ignore_eos), or a
              stream that ended with [DONE] and those tokens
    left      the client disconnected on purpose
    refused   503 with Retry-After (overload, or a replica being replaced:
              the client retries after that delay)
    errored   a clear error answer: another status, an error event in a
              stream, a wrong token count
    lost      no answer: a dropped connection, a stream cut without [DONE]
              or an error event, nothing within the timeout

so `sent == ok + left + refused + errored + lost`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

KINDS = ("plain", "stream", "chat", "n2", "leave")


@dataclass
class LoadReport:
    outcomes: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    tokens: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # the first few, for the message

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())

    def summary(self) -> dict:
        return {"sent": self.sent, **{k: self.outcomes[k] for k in
                                      ("ok", "left", "refused", "errored", "lost")},
                "requests_per_s": self.sent / self.seconds if self.seconds else 0.0,
                "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
                "failures": self.failures[:5]}


async def mixed_load(url: str, model: str, *, clients: int, duration_s: float,
                     seed: int = 0, max_tokens: int = 16, timeout_s: float = 120.0,
                     headers: dict[str, str] | None = None) -> LoadReport:
    """`clients` concurrent clients for `duration_s` against `url` (the app's root)."""
    report = LoadReport()
    deadline = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits,
                                 headers=headers or {}) as session:
        async def client(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < deadline:
                kind = rng.choice(KINDS)
                report.kinds[kind] += 1
                try:
                    outcome, tokens = await _one(session, model, kind, rng, max_tokens)
                except httpx.HTTPError as error:  # timeouts, dropped connections
                    outcome, tokens = f"lost: {type(error).__name__}: {error}", 0
                except (ValueError, KeyError) as error:  # an answer that is not ours
                    outcome, tokens = f"errored: {type(error).__name__}: {error}", 0
                if ":" in outcome:
                    report.failures.append(f"{kind}: {outcome}")
                    outcome = outcome.split(":", 1)[0]
                report.outcomes[outcome] += 1
                report.tokens += tokens
                if outcome == "refused":
                    await asyncio.sleep(1.0)  # as Retry-After says

        start = time.monotonic()
        await asyncio.gather(*(client(i) for i in range(clients)))
        report.seconds = time.monotonic() - start
    return report


async def flood(url: str, model: str, count: int, *, prompt: str = "flood " * 450,
                max_tokens: int = 8, timeout_s: float = 600.0) -> list[httpx.Response | Exception]:
    """`count` completions sent at once; each one's answer, or the exception in its place."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body)
                                      for _ in range(count)), return_exceptions=True)


async def _one(session: httpx.AsyncClient, model: str, kind: str, rng: random.Random,
               max_tokens: int) -> tuple[str, int]:
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "paged", "cache"])
                     for _ in range(rng.randint(2, 60)))
    base = {"model": model, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": rng.choice([0.0, 0.8])}
    if kind == "chat":
        path = "/v1/chat/completions"
        body = {**base, "messages": [{"role": "user", "content": words}]}
    else:
        body, path = {**base, "prompt": words}, "/v1/completions"
    if kind == "n2":
        body["n"] = 2
    if kind in ("stream", "leave"):
        return await _stream(session, path, body, leave_after=rng.randint(1, 4)
                             if kind == "leave" else None)
    response = await session.post(path, json=body)
    if response.status_code == 503 and response.headers.get("retry-after"):
        return "refused", 0
    if response.status_code != 200:
        return f"errored: {response.status_code} {response.text[:200]}", 0
    answer = response.json()
    choices = answer["choices"]
    expected = body.get("n", 1) * max_tokens
    if answer["usage"]["completion_tokens"] != expected or len(choices) != body.get("n", 1):
        return f"errored: {answer['usage']} for n={body.get('n', 1)}", 0
    return "ok", expected


async def _stream(session: httpx.AsyncClient, path: str, body: dict,
                  leave_after: int | None) -> tuple[str, int]:
    chunks, done = 0, False
    async with session.stream("POST", path, json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as response:
        if response.status_code == 503 and response.headers.get("retry-after"):
            return "refused", 0
        if response.status_code != 200:
            return f"errored: {response.status_code}", 0
        usage = None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return f"errored: error event {event['error']}", 0
            usage = event.get("usage") or usage
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return "left", 0  # leaving the block closes the connection
    if not done:
        return f"lost: the stream ended without [DONE] after {chunks} chunks", 0
    if usage is None or usage["completion_tokens"] != body["max_tokens"]:
        return f"errored: usage {usage} for max_tokens={body['max_tokens']}", 0
    return "ok", body["max_tokens"]
