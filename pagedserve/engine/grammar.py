"""Grammars for structured outputs, on xgrammar: compiled once per spec, off the engine
loop; matched token by token, one matcher per sequence.

    StructuredOutputsParams --GrammarCompiler.submit--> Future[CompiledGrammar]
        (a pool thread; cached by the spec's key, failures too)
    CompiledGrammar --Matcher--> each step: fill(bitmask, row) before sampling,
        accept(token) after; fork() for a sequence's copy; rollback(n)

JSON is compiled without free whitespace: separators are ", " and ": ", as
Python's json.dumps writes them, so a small model cannot wander into endless
blank space inside a document. xgrammar (0.2, its issue #800) writes strings
with minLength or maxLength over a character class that admits the control
characters JSON forbids unescaped (a raw tab, say, which json.loads refuses);
`_json_grammar` closes that class as its plain strings have it.

A bitmask row holds one bit per vocabulary entry (int32 words, 32 entries
each, bit set = allowed): `new_bitmask` allocates them and the worker's
sampler applies them to the logits on the device (worker/token_masks.py).

Grammars are user input that compiles to automata, so `GrammarLimits` bounds
them: a spec past `max_spec_bytes` is refused before compiling, and a compile
that runs past `compile_timeout_s` fails its request (the pool thread finishes
it in the background; xgrammar's compile cannot be interrupted, which is why
the pool is small and the size check comes first).

xgrammar is imported when a compiler is made: the engine runs without it, and
a request for structured output is then refused with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pagedserve.errors import RequestError
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.scheduler.step import StepInput
from pagedserve.worker.token_masks import PendingBitmask

logger = logging.getLogger(__name__)

BITS_PER_WORD = 32
# Masks of this many rows and more are filled on xgrammar's threads ("auto": half the
# cores), as vLLM does; fewer cost less on the calling thread.
FILL_THREADS_FROM_ROWS = 128

# xgrammar's class for a character of a length-bounded JSON string, and the class of
# its unbounded strings, which leaves out U+0000-U+001F as JSON requires.
_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


@dataclass(frozen=True)
class GrammarLimits:
    max_spec_bytes: int = 64 * 1024
    compile_timeout_s: float = 10.0
    compile_threads: int = 2
    cache_entries: int = 256


def xgrammar_available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


def check_size(params: StructuredOutputsParams, limits: GrammarLimits) -> None:
    """A spec past the size limit is refused before anything compiles it."""
    size = len(params.spec.encode())
    if size > limits.max_spec_bytes:
        raise RequestError(f"structured_outputs.{params.kind}",
                           f"structured_outputs.{params.kind} is {size} bytes, past the limit "
                           f"of {limits.max_spec_bytes} (structured_outputs.max_spec_bytes in "
                           "the config)")


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32, every bit set (everything allowed)."""
    return torch.full((rows, -(-vocab_size // BITS_PER_WORD)), -1, dtype=torch.int32)


def _choice_grammar(choices: tuple[str, ...]) -> str:
    """EBNF whose root is one of the strings: JSON string escapes are EBNF's."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


class GrammarCompiler:
    """Compiles specs against one tokenizer's vocabulary, `compile_threads` at a time."""

    def __init__(self, tokenizer, vocab_size: int, limits: GrammarLimits = GrammarLimits()
                 ) -> None:
        import xgrammar as xgr

        self.limits = limits
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        # The cache is ours (futures by key, so a spec in flight is compiled once).
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(limits.compile_threads,
                                        thread_name_prefix="pagedserve-grammar")
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()

    def submit(self, params: StructuredOutputsParams) -> Future:
        """The compiled grammar for `params`, compiled on a pool thread unless cached. A
        spec past the size limit raises RequestError at once; a spec the compiler
        rejects fails the future with one, quoting the compiler."""
        check_size(params, self.limits)
        with self._lock:
            future = self._cache.get(params.key)
            if future is not None and not future.cancelled():
                self._cache.move_to_end(params.key)
                return future
            future = self._pool.submit(self._compile, params)
            self._cache[params.key] = future
            while len(self._cache) > self.limits.cache_entries:
                self._cache.popitem(last=False)
            return future

    def compile(self, params: StructuredOutputsParams):
        """submit(params), waited for up to the time limit (for callers off the engine
        loop, such as the offline `LLM`)."""
        future = self.submit(params)
        try:
            return future.result(timeout=self.limits.compile_timeout_s)
        except FutureTimeoutError:
            raise self.timeout_error(params) from None

    def timeout_error(self, params: StructuredOutputsParams) -> RequestError:
        return RequestError(f"structured_outputs.{params.kind}",
                            f"compiling structured_outputs.{params.kind} ran past the limit "
                            f"of {self.limits.compile_timeout_s:g} s "
                            "(structured_outputs.compile_timeout_s in the config)")

    def _compile(self, params: StructuredOutputsParams):
        kind, spec = params.kind, params.spec
        try:
            if kind in ("json", "json_object"):
                schema = spec if kind == "json" else '{"type": "object"}'
                return self._compiler.compile_grammar(_json_grammar(schema))
            if kind == "regex":
                return self._compiler.compile_regex(spec)
            if kind == "choice":
                return self._compiler.compile_grammar(_choice_grammar(tuple(json.loads(spec))))
            return self._compiler.compile_grammar(spec)
        except (RuntimeError, ValueError) as error:  # xgrammar's parse and schema errors
            message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise RequestError(f"structured_outputs.{kind}",
                               f"structured_outputs.{kind} does not compile: {message}") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _json_grammar(schema: str):
    """xgrammar's grammar of a JSON schema, with its length-bounded strings' control
    characters ruled out (the module's note)."""
    import xgrammar as xgr

    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


class Matcher:
    """Where one sequence stands in its grammar."""

    def __init__(self, compiled, _matcher=None) -> None:
        import xgrammar as xgr

        self._compiled = compiled
        self._matcher = _matcher if _matcher is not None else xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False where the grammar does not allow it (then
        nothing changes)."""
        return self._matcher.accept_token(token)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of a new_bitmask: the tokens allowed next."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def xgrammar_matcher(self):
        """xgrammar's own, for its batch calls."""
        return self._matcher

    def rollback(self, tokens: int) -> None:
        self._matcher.rollback(tokens)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar allows from here (speculated
        tokens); the matcher stays where it is."""
        count = 0
        for token in tokens:
            if self._matcher.is_terminated() or not self._matcher.accept_token(token):
                break
            count += 1
        if count:
            self._matcher.rollback(count)
        return count

    def fill_rows(self, bitmask: torch.Tensor, row: int, draft: list[int]) -> None:
        """Rows `row` .. `row + len(draft)`: the tokens allowed here and after each draft
        token in turn (the grammar allows them all: `valid_prefix`)."""
        self.fill(bitmask, row)
        for offset, token in enumerate(draft, start=1):
            self._matcher.accept_token(token)
            self.fill(bitmask, row + offset)
        if draft:
            self._matcher.rollback(len(draft))

    def fork(self) -> Matcher:
        return Matcher(self._compiled, self._matcher.fork())

    @property
    def terminated(self) -> bool:
        """Whether the grammar is complete and its stop token accepted."""
        return self._matcher.is_terminated()


class StructuredOutputs:
    """The engine's side of structured outputs: requests checked at the edge, their
    grammars compiled (GrammarCompiler), a matcher given to each request's first
    sequence (samples fork it), and each step's constrained rows masked."""

    def __init__(self, tokenizer, vocab_size: int, limits: GrammarLimits = GrammarLimits()
                 ) -> None:
        self.tokenizer, self.vocab_size, self.limits = tokenizer, vocab_size, limits
        self._compiler: GrammarCompiler | None = None
        self._batch_matchers: dict[int | str, Any] = {}  # xgrammar's, by thread count

    def validate(self, params: StructuredOutputsParams) -> None:
        """Refuse what this engine cannot constrain, before anything is queued."""
        kind = f"structured_outputs.{params.kind}"
        if self.tokenizer is None:
            raise RequestError(kind, "structured_outputs needs the model's tokenizer to map "
                                     "a grammar onto tokens; this engine was started with "
                                     "skip_tokenizer_init")
        if not xgrammar_available():
            raise RequestError(kind, "structured_outputs needs the xgrammar package, which "
                                     "this installation lacks (pip install xgrammar)")
        check_size(params, self.limits)

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.limits)
        return self._compiler

    def matcher(self, params: StructuredOutputsParams, compiled=None) -> Matcher:
        """A matcher at the grammar's start: of `compiled` (compiled off the loop by the
        caller), else compiled now, waiting up to the time limit."""
        return Matcher(compiled if compiled is not None else self.compiler.compile(params))

    def attach_masks(self, step: StepInput, grammar_of: Callable[[int], Matcher | None],
                     late: bool = False) -> StepInput:
        """The step with a bitmask row for each constrained sequence that samples
        (`grammar_of(seq_id)`: its matcher or None); the step itself where none does.

        `late`: the step goes out while the one before runs, whose tokens its
        constrained sequences' grammars have not taken yet. Its mask is then a
        PendingBitmask that `fill_late` fills once they have.
        """
        rows = 0
        for scheduled in step.seqs:
            if scheduled.do_sample and grammar_of(scheduled.seq_id) is not None:
                scheduled.bitmask_row = rows  # and one more per draft token it verifies
                rows += 1 + len(scheduled.draft_token_ids or ())
        if not rows:
            return step
        bitmask = new_bitmask(rows, self.vocab_size)
        if late:
            return dataclasses.replace(step, token_bitmask=PendingBitmask(bitmask))
        self._fill(step, bitmask, grammar_of)
        return dataclasses.replace(step, token_bitmask=bitmask)

    def fill_late(self, step: StepInput, grammar_of: Callable[[int], Matcher | None]) -> None:
        """Fill a step's PendingBitmask, now that the step before it is taken in, and
        let its sampling go on."""
        pending = step.token_bitmask
        if isinstance(pending, PendingBitmask) and not pending.is_ready:
            self._fill(step, pending.tensor, grammar_of)
            pending.set_ready()

    def _fill(self, step: StepInput, bitmask: torch.Tensor,
              grammar_of: Callable[[int], Matcher | None]) -> None:
        """The rows of the step's live grammars, filled in one call into xgrammar (on
        threads, for a large batch, as vLLM does), not one Python call per row."""
        matchers, rows = [], []
        for scheduled in step.seqs:
            if scheduled.bitmask_row is None:
                continue
            grammar = grammar_of(scheduled.seq_id)
            # One that ended meanwhile samples a token that is dropped: its row stays open.
            if grammar is None or grammar.terminated:
                continue
            if scheduled.draft_token_ids:  # a row for each position it verifies
                grammar.fill_rows(bitmask, scheduled.bitmask_row, scheduled.draft_token_ids)
            else:
                matchers.append(grammar.xgrammar_matcher)
                rows.append(scheduled.bitmask_row)
        if matchers:
            self._batch_matcher(len(matchers)).batch_fill_next_token_bitmask(
                matchers, bitmask, rows)

    def _batch_matcher(self, rows: int):
        import xgrammar as xgr

        threads: int | Literal["auto"] = 1 if rows < FILL_THREADS_FROM_ROWS else "auto"
        if threads not in self._batch_matchers:
            self._batch_matchers[threads] = xgr.BatchGrammarMatcher(max_threads=threads)
        return self._batch_matchers[threads]

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
