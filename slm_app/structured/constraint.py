"""The token constraint: ``JsonSchemaConstraint``, the per-token mask a local engine's decode loop
applies, with budget steering so the JSON closes within the token budget.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.numpy
import numpy as np

from slm_app.backends.base import TokenConstraint
from slm_app.structured.compile import CompiledSchema
from slm_app.structured.generation import Outcome, Verdict
from slm_app.structured.intake import SchemaError
from slm_app.structured.validation import validate_output
from slm_app.structured.walk import (
    DECODE_WALK_MASKS, DECODE_WALK_SECONDS, FREE_TEXT, MAX_CHECKED, NEAR, RECHECK_EVERY, RECHECK_SHARE, TIGHT, VERIFY,
    WALK_SECONDS, _facts, _JsonPosition, shortest_completion, walk_to_completion,
)

if TYPE_CHECKING:
    from slm_app.scheduler import Completion


class JsonSchemaConstraint:
    """``TokenConstraint`` over an llguidance matcher: which tokens keep the JSON on the schema and,
    given the remaining budget, closable in time.

    The end-of-text token is in the mask only once the JSON is complete (llguidance's rule), and
    ``is_finished`` turns true as soon as nothing more can follow, so the backend stops there.
    """

    def __init__(self, compiled: CompiledSchema, vocab_width: int, steer: bool = True):
        self.compiled = compiled
        self.vocab_width = vocab_width
        self._matcher = compiled.new_matcher()
        # One bit per token of the tokenizer's vocabulary, filled in place by llguidance (GIL released).
        # Token 32*j + i is bit i of word j; on the little-endian hosts llguidance ships for, that is
        # bit i % 8 of byte 4*j + i // 8, so a uint8 view unpacks in token order with no copy.
        self._bits = llguidance.numpy.allocate_token_bitmask(1, compiled.tokenizer.vocab_size)
        self._bytes = self._bits.view(np.uint8)
        self._facts = _facts(compiled.tokenizer) if steer else None
        self._safe = None if self._facts is None else self._widen(self._facts.safe)
        self._path: list[int] | None = None  # a shortest completion, from the current state if _fresh
        self._closing: int | None = None  # its length when last computed (None: none found)
        self._fresh = False
        self._walked = False
        self._backoff = 0  # tokens to wait before walking again after a walk that found nothing
        self._stale = False  # a token that opens something came since the last walk
        self._since = 0  # tokens consumed since the last walk
        self._json = _JsonPosition()
        if compiled.min_tokens is not None:  # the compile-time walk starts from the same state
            self._path, self._closing, self._fresh, self._walked = list(compiled.shortest), compiled.min_tokens, True, True
        self.steered = 0  # steps at which the budget narrowed the mask (for tests and benchmarks)
        self.overrun = False  # the shortest completion outgrew the budget: this output may be cut short

    def _widen(self, mask: np.ndarray) -> np.ndarray:
        out = np.zeros(self.vocab_width, dtype=np.bool_)
        n = min(self.vocab_width, mask.size)
        out[:n] = mask[:n]
        return out

    def allowed_tokens(self, remaining: int | None = None) -> np.ndarray:
        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bits)
        # count= cuts a vocabulary wider than the logits, and pads with False (zero bits) when the
        # logits are wider than the vocabulary (models pad their embedding to a multiple of 64...).
        allowed = np.unpackbits(self._bytes, count=self.vocab_width, bitorder="little").view(np.bool_)
        if self._facts is not None and self._json.in_key and self._json.open_keys():
            self._forbid_repeated_keys(allowed)
        if remaining is None or self._facts is None or self._matcher.is_stopped():
            return allowed
        path = self._closing_path(remaining)
        if path is None:  # no completion found (or none within the budget): nothing to steer to
            return allowed
        slack = remaining - len(path)
        if slack > VERIFY or not path:
            return allowed
        if slack > NEAR:
            # A choice among few tokens (an enum value, an anyOf branch, close or go on) can commit
            # to a much longer completion in one token: those few are checked one by one.
            few = np.flatnonzero(allowed)
            if few.size <= MAX_CHECKED:
                # Each check is a walk: past a handful of candidates only those that open something.
                self._keep_fitting(allowed, few if few.size <= 4 else few[self._facts.opens[few]], remaining)
                if not allowed.any():  # none checked out (a walk too costly to finish): leave the choice
                    allowed[few] = True
            return allowed
        self.steered += 1
        if slack <= TIGHT or self._json.in_key:
            # Only the shortest completion's next token: a key's name decides which value follows,
            # so near the end the walk picks it, not the model.
            allowed[:] = False
        else:
            allowed &= self._safe
            few = np.flatnonzero(allowed)
            if few.size <= MAX_CHECKED:
                self._keep_fitting(allowed, few, remaining)
            elif few.size <= FREE_TEXT:  # neither a few checkable choices nor free text: play safe
                allowed[:] = False
        if path[0] < self.vocab_width:
            allowed[path[0]] = True
        return allowed

    def _forbid_repeated_keys(self, allowed: np.ndarray) -> None:
        """Clear tokens that would close a key the open object already has.

        llguidance lets an object with free-form keys (or a declared one, again) repeat a key; the
        output would then be rejected (a repeated key is ambiguous JSON), after a whole attempt's
        tokens. Only tokens holding a quote can close a key, so few are checked, and only in keys."""
        n = min(allowed.size, self._facts.quotes.size)
        candidates = np.flatnonzero(allowed[:n] & self._facts.quotes[:n])
        pieces = self._facts.token_bytes
        bad = [t for t in candidates.tolist() if self._json.closes_repeated_key(pieces[t])]
        if bad and len(bad) < candidates.size + np.count_nonzero(allowed[:n] & ~self._facts.quotes[:n]):
            allowed[bad] = False  # never all of them: an empty mask would end the output in error

    def _keep_fitting(self, allowed: np.ndarray, candidates: np.ndarray, remaining: int) -> None:
        """Clear the candidates after which no completion fits in what is left of the budget."""
        facts = self._facts
        for token in candidates.tolist():
            if token == facts.eos:
                continue
            m = self._matcher.deep_copy()
            position = self._json.copy()
            position.feed(facts.token_bytes[token])
            if not m.consume_token(token) or (
                    not m.is_accepting()
                    and shortest_completion(m, self.compiled.tokenizer, limit=remaining - 1, position=position,
                                            max_masks=DECODE_WALK_MASKS, hints=self.compiled.hints,
                                            seconds=DECODE_WALK_SECONDS) is None):
                allowed[token] = False

    def _closing_path(self, remaining: int) -> list[int] | None:
        """The shortest completion from here if it may matter now (else a stale one, or None)."""
        # The walk costs ~0.04 ms a token (GPT-2), a mask lookup more where it must fall back, so it
        # runs only when it may matter: near the end (every step: its next token is needed); within
        # 2*VERIFY tokens of slack after a token that opens something (where the shortest completion
        # can grow by more than a token); else after slack/RECHECK_SHARE tokens. When the model takes
        # the walk's own next token, the rest of the walk is still a shortest completion.
        if self._fresh:
            return self._path
        if self._closing is None:
            walk = not self._walked or self._since >= self._backoff
        else:
            slack = remaining - self._closing
            walk = (slack <= NEAR + TIGHT or (self._stale and slack <= 2 * VERIFY)
                    or self._since >= max(RECHECK_EVERY, slack // RECHECK_SHARE))
        if walk and self._path and self._closing is not None and not self._stale and len(self._path) < remaining:
            # The last walk's completion may still complete from here (text went on inside a string
            # or a number): checking it costs no mask, a new walk may cost many. Only if it still
            # fits: after text of its own the model may need a shorter one ("-" * 6, not "-" * 12).
            m = self._matcher.deep_copy()
            if m.consume_tokens(self._path) and m.is_accepting():
                self._fresh, self._since = True, 0
                return self._path
        if walk:
            self._walked = True
            self._path = shortest_completion(self._matcher, self.compiled.tokenizer, limit=remaining + 1,
                                             position=self._json, max_masks=DECODE_WALK_MASKS,
                                             hints=self.compiled.hints, seconds=DECODE_WALK_SECONDS)
            if self._path is None:
                self.overrun = True  # no completion found within the budget: the output may be cut short
                self._backoff = 2 * self._backoff or 2
            else:
                self._backoff = 0
            self._closing = None if self._path is None else len(self._path)
            self._fresh, self._stale, self._since = self._path is not None, False, 0
        return self._path

    def consume(self, token_id: int) -> None:
        token_id = int(token_id)
        self._matcher.consume_token(token_id)  # on a disallowed token the matcher enters its error state
        if self._facts is None or not 0 <= token_id < len(self._facts.token_bytes):
            return
        self._json.feed(self._facts.token_bytes[token_id])
        if self._fresh and self._path and self._path[0] == token_id:
            self._path = self._path[1:]
            self._closing = len(self._path)
            return
        self._fresh = False
        self._since += 1
        self._stale |= bool(self._facts.opens[token_id])

    def forced_tokens(self) -> list[int]:
        if self._matcher.is_stopped() or self._matcher.is_error():
            return []
        return self._matcher.compute_ff_tokens()

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()  # also true in the error state: stop wasting tokens

    def is_accepting(self) -> bool:
        """The JSON so far is complete (more might still be allowed, as after ``12`` for a number)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        if not self._matcher.is_error():
            return None
        return self._matcher.get_error() or "the matcher is in its error state"


def check_fits(compiled: CompiledSchema, max_new_tokens: int, cap: int) -> None:
    """Refuse, with the reason, a schema whose smallest instance takes more than the budget.

    The walk is greedy, so its length is an upper bound; a walk that found nothing ("stuck":
    a pattern it cannot satisfy) refuses nothing: the model may still do better.
    """
    status, walked, limit = compiled.shortest_status, compiled.shortest or (), compiled.walk_limit
    if status == "complete" and len(walked) <= max_new_tokens or status == "stuck":
        return
    if status == "long" and limit <= cap:  # measure up to the tier's cap, to say what budget would do
        limit = cap + 1
        walked, status = walk_to_completion(compiled.new_matcher(), compiled.tokenizer, limit, hints=compiled.hints,
                                             seconds=WALK_SECONDS)
        if status == "stuck" or status == "complete" and len(walked) <= max_new_tokens:
            return
    example = compiled.tokenizer.decode_str(list(walked[:48]))
    example = example if len(walked) <= 48 else example + "..."
    need = f"{len(walked)} tokens" if status == "complete" else f"more than {limit - 1} tokens"
    least = len(walked) if status == "complete" else None
    how = (f"raise max_new_tokens to at least {least}" if least is not None and least <= cap else
           f"this tier allows at most {cap} tokens for structured output, so simplify the schema "
           f"(fewer required members, shorter minimums)" if least is not None else
           "simplify the schema (fewer required members, shorter minimums) or raise max_new_tokens")
    raise SchemaError(f"the smallest JSON this schema allows takes {need} of this model "
                      f"({example}), more than the budget of {max_new_tokens}: {how}")


class TokenConstraintPlan:
    """How a local engine honours a schema: an llguidance grammar compiled for its tokenizer, a fresh
    ``JsonSchemaConstraint`` per attempt in its decode loop (``structured.generation.SchemaPlan``)."""

    details: dict[str, Any] = {}

    def __init__(self, schema: dict, compiled: CompiledSchema, vocab_width: int, steer: bool = True):
        self.compiled, self.vocab_width, self.steer = compiled, vocab_width, steer
        self.validated = schema  # the schema as given: the validator judges against it
        self.schema = compiled.schema  # as compiled: what the prompt shows

    @property
    def relaxed(self) -> bool:
        return self.compiled.relaxed

    def check_fits(self, max_new_tokens: int, cap: int) -> None:
        check_fits(self.compiled, max_new_tokens, cap)

    def new_constraint(self) -> JsonSchemaConstraint:
        return JsonSchemaConstraint(self.compiled, self.vocab_width, steer=self.steer)

    def ask_another_way(self, final: Completion) -> bool:
        return False  # the grammar is ours: there is no other way to ask

    def judge(self, constraint: JsonSchemaConstraint, final: Completion) -> Verdict:
        if constraint.error:
            return Verdict(Outcome.CONSTRAINT_FAILED, None, f"constrained decoding failed: {constraint.error}")
        if not (constraint.is_finished() or constraint.is_accepting()):
            if final.finish_reason == "length":
                return Verdict(Outcome.TRUNCATED, None,
                               f"truncated at {final.completion_tokens} tokens before the JSON was complete")
            return Verdict(Outcome.STOPPED, None,
                           f"generation stopped ({final.finish_reason}) before the JSON was complete")
        data, error = validate_output(final.text, self.validated)
        return Verdict(Outcome.OK if error is None else Outcome.INVALID, data, error)
