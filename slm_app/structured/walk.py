"""The walk: a greedy path over a copy of the matcher to a shortest completion of the JSON.

It measures the smallest instance of a schema (is a budget enough?) and, while decoding, the
shortest way to close the value from where the model is, which budget steering narrows the mask to.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from dataclasses import dataclass
# jsonschema checks "pattern" with Python's re, so Python's own regex parser decides what is valid.
from re import _constants as sre_c, _parser as sre_parse
from typing import Any, Sequence

import llguidance
import llguidance.numpy
import numpy as np

from slm_app.structured.intake import _REPEATS, _subschemas

# Shared by the compile cache and the per-tokenizer facts below.
_cache_lock = threading.Lock()

# ---------------------------------------------------------------------------------------------
# The token constraint
# ---------------------------------------------------------------------------------------------


# Budget steering. A model (a random one especially, or one caught in a loop) can spend any budget
# before the JSON closes. So every step the constraint knows a shortest way to close the value from
# where it is (``shortest_completion``: a greedy walk over a copy of the matcher), and as the
# remaining budget comes near its length it narrows the mask: first to tokens that open nothing
# (no ``{ [ , :`` or escapes: the current string or number may go on, containers may close), then,
# at the last moment, to the walk's next token only. Output then closes within budget whenever the
# walk's completion fits, and the walk from the start measures the smallest instance, which is how
# a schema that cannot fit is refused up front.
NEAR = 8  # slack (tokens to spare beyond the shortest completion) at which the mask starts narrowing
TIGHT = 2  # slack at which only the shortest completion's next token is allowed
RECHECK_EVERY = 8  # near the end, recompute the shortest completion at least this often
VERIFY = 2 * NEAR  # slack at which a choice among a few tokens is checked token by token
MAX_CHECKED = 16  # "a few"
FREE_TEXT = 256  # more allowed tokens than this, near the end, is free text (a string's content)
# Farther out, recompute it after slack/RECHECK_SHARE tokens: the shortest completion grows with what
# the model writes (each level of a recursive schema it opens adds its closers and required members),
# and a walk first rerun only within a fixed distance of the end found it already longer than the
# budget (the model had nested 40 levels deep). A geometric schedule: ~30 walks over 1,024 tokens.
RECHECK_SHARE = 8
# Tried in this order at each step of the walk, before falling back to the full mask: closers first,
# then "," (allowed only where a required member or item must follow, or as string text), then the
# shortest values ("1" before "0": years, exclusive minimums and dates refuse 0 more often).
_WALK_PREFERENCE = ('"', "}", "]", ",", "1", "0", '""', "[]", "{}", "null", "false", "true", "[", "{", ":")
# Outside a string '"' opens one (a key: an optional member): closing the object or array comes first.
_OUTSIDE_PREFERENCE = ("}", "]") + _WALK_PREFERENCE[:1] + _WALK_PREFERENCE[3:]
_OPENERS = frozenset(b"{[,:\\")


@dataclass(frozen=True, eq=False)
class _VocabFacts:
    """Per tokenizer: the walk's preferred tokens and which tokens open nothing."""

    preferred: tuple[int, ...]  # inside a string: '"' first, to close it
    outside: tuple[int, ...]  # elsewhere '"' opens a string: "}" and "]" first, to close before opening
    eos: int
    safe: np.ndarray  # bool over the vocabulary: the token's bytes contain none of { [ , : \\
    opens: np.ndarray  # the complement (special tokens such as EOS carry no JSON: they open nothing)
    token_bytes: tuple[bytes, ...]
    quotes: np.ndarray  # bool over the vocabulary: the token's bytes contain '"' (it may open or close a key)


_vocab_facts: dict[int, tuple[llguidance.LLTokenizer, _VocabFacts]] = {}


def _facts(tokenizer: llguidance.LLTokenizer) -> _VocabFacts:
    hit = _vocab_facts.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    def single_tokens(texts: Sequence[str]) -> tuple[int, ...]:
        out: list[int] = []
        for text in texts:
            ids = tokenizer.tokenize_str(text)
            if len(ids) == 1 and ids[0] not in out:
                out.append(ids[0])
        return tuple(out)

    n = tokenizer.vocab_size
    pieces = tuple(b"" if tokenizer.is_special_token(i) else tokenizer.decode_bytes([i]) for i in range(n))
    opens = np.fromiter((not _OPENERS.isdisjoint(p) for p in pieces), dtype=np.bool_, count=n)
    quotes = np.fromiter((b'"' in p for p in pieces), dtype=np.bool_, count=n)
    facts = _VocabFacts(single_tokens(_WALK_PREFERENCE), single_tokens(_OUTSIDE_PREFERENCE), tokenizer.eos_token,
                        ~opens, opens, pieces, quotes)
    with _cache_lock:
        _vocab_facts[id(tokenizer)] = (tokenizer, facts)  # holds the tokenizer: its id stays unique
    return facts


def _allowed_ids(matcher: llguidance.LLMatcher, n: int) -> np.ndarray:
    bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(bits, count=n, bitorder="little"))


# Strings the walk tries first when it opens a string value: a shortest match of each pattern in the
# schema and an example of each format, so that it can close strings whose grammar a greedy choice
# of characters would never satisfy (``^.*\\.md$``, ``[0-9]+-[0-9]+``, an email). The grammar decides
# whether one fits where the walk is; these are only suggestions.
_FORMAT_EXAMPLES = {
    "date-time": "2000-01-01T00:00:00Z", "date": "2000-01-01", "time": "00:00:00Z", "duration": "P1D",
    "email": "a@b.co", "idn-email": "a@b.co", "hostname": "a.co", "idn-hostname": "a.co", "ipv4": "1.1.1.1",
    "ipv6": "::1", "uri": "a:b", "uri-reference": "a", "iri": "a:b", "iri-reference": "a", "uuid":
    "00000000-0000-0000-0000-000000000000", "uri-template": "a", "json-pointer": "", "relative-json-pointer": "0",
    "regex": "a",
}
_MAX_HINTS = 64
# Fillers for strings that need only a length (minLength, or any content at all): one character
# repeated. The walk tries hints fewest tokens first and the grammar decides which fit; "-" first, as
# tokenizers merge runs of it ("-" * 20 is 2 GPT-2 tokens, "a" * 20 is 6).
_FILLERS = ("-", "a", "1")
_MAX_FILLED = 8  # distinct minLengths given fillers
_MAX_KEY_HINTS = 256
_CATEGORY_CHARS = {sre_c.CATEGORY_DIGIT: "1", sre_c.CATEGORY_WORD: "a", sre_c.CATEGORY_SPACE: " ",
                   sre_c.CATEGORY_NOT_DIGIT: "a", sre_c.CATEGORY_NOT_WORD: "-", sre_c.CATEGORY_NOT_SPACE: "a"}


def shortest_match(regex: str, min_length: int = 0) -> str | None:
    """A short string ``regex`` matches (searched, as JSON Schema's "pattern" is), of at least
    ``min_length`` characters if one open repetition can make it so, or None if this simple
    construction cannot tell (lookarounds, backreferences...)."""
    try:
        seq = sre_parse.parse(regex)
        text = _example(seq)
        if len(text) < min_length:  # ".+@.+" with a minLength of 10: the first "+" takes the rest
            text = _example(seq, [min_length - len(text)])
    except (re.error, RecursionError, _NoExample):
        return None
    return text if re.search(regex, text) else None


class _NoExample(Exception):
    pass


def _example(seq: Any, pad: list[int] | None = None) -> str:
    """``pad``: extra repeats for the first repetition open enough to take them (used up as it goes)."""
    out = []
    for op, av in seq:
        if op is sre_c.LITERAL:
            out.append(chr(av))
        elif op is sre_c.ANY:
            out.append("a")
        elif op is sre_c.IN:
            out.append(_in_example(av))
        elif op in _REPEATS or op is sre_c.POSSESSIVE_REPEAT:
            lo, hi, body = av
            if lo > 256:  # a hint is a suggestion for a short string, not worth building a long one
                raise _NoExample
            n = lo
            if pad and pad[0] > 0 and hi - lo >= pad[0]:  # hi is MAXREPEAT when open
                n, pad[0] = lo + pad[0], 0
            out.append(_example(body) * n)
        elif op is sre_c.SUBPATTERN:
            out.append(_example(av[3], pad))
        elif op is sre_c.ATOMIC_GROUP:
            out.append(_example(av, pad))
        elif op is sre_c.BRANCH:
            out.append(min((_example(alt) for alt in av[1]), key=len))
        elif op is sre_c.AT:
            continue
        else:  # lookarounds, backreferences, NOT_LITERAL...: not worth the complexity
            raise _NoExample
    return "".join(out)


def _in_example(items: Any) -> str:
    if items and items[0][0] is sre_c.NEGATE:
        excluded = "".join(_in_example([item]) for item in items[1:] if item[0] is not sre_c.NEGATE)
        return next(c for c in "a1-_ " if c not in excluded)
    for op, av in items:
        if op is sre_c.LITERAL:
            return chr(av)
        if op is sre_c.RANGE:
            lo, hi = av
            return chr(max(lo, min(hi, ord("a")))) if lo <= ord("a") <= hi else chr(lo)
        if op is sre_c.CATEGORY and av in _CATEGORY_CHARS:
            return _CATEGORY_CHARS[av]
    raise _NoExample


@dataclass(frozen=True)
class WalkHints:
    """What the walk tries first inside a string, each as JSON string contents with the closing quote:
    ``values``: the schema's pattern and format examples; ``lengths``: its minLengths, which fillers
    make up from what the string has so far (``_first_fitting``); ``keys``: the names objects require
    (a greedy walk writing a key character by character opens whichever optional member comes first
    in the order of token ids)."""

    values: tuple[bytes, ...] = ()
    lengths: tuple[int, ...] = ()
    keys: tuple[bytes, ...] = ()


NO_HINTS = WalkHints()


def _string_hints(schema: dict) -> WalkHints:
    """The ``WalkHints`` of ``schema``."""
    texts: list[str] = []
    names: list[str] = []
    lengths: set[int] = set()
    for _path, node in _subschemas(schema):
        if isinstance(node.get("required"), list):
            names.extend(name for name in node["required"] if isinstance(name, str))
        if isinstance(node.get("minLength"), int) and 1 < node["minLength"] <= 256:
            lengths.add(node["minLength"])
        if isinstance(node.get("pattern"), str):
            least = node.get("minLength") if isinstance(node.get("minLength"), int) else 0
            texts.append(shortest_match(node["pattern"], min(least, 256)) or "")
        if isinstance(node.get("format"), str):
            texts.append(_FORMAT_EXAMPLES.get(node["format"], ""))
        if isinstance(node.get("patternProperties"), dict):
            texts.extend(shortest_match(r) or "" for r in node["patternProperties"])
    specific = list(dict.fromkeys(t for t in texts if t))[:_MAX_HINTS]

    def quoted(items: Sequence[str]) -> tuple[bytes, ...]:
        return tuple(json.dumps(text, ensure_ascii=False)[1:].encode() for text in dict.fromkeys(items))

    keys = list(dict.fromkeys(names))[:_MAX_KEY_HINTS]
    return WalkHints(quoted(specific), tuple(sorted(lengths)[:_MAX_FILLED]), quoted(keys))


# Full-mask look-ups one walk may make, and for how long: bounds its cost (a mask costs up to a few ms
# on big grammars, ~75-350 ms on lexer-heavy ones). While decoding, a walk that failed is retried only
# after 2, 4, 8... more tokens.
# Compile time: big schemas (a cloud service catalogue of 60 required members) need ~200 look-ups to
# find that their smallest instance is longer than the budget (refused with the reason, not cut off).
MAX_WALK_MASKS = 256
WALK_SECONDS = 1.0
# Decoding: GOV.UK's content schemas (60 members with uuids and enums) need ~40 look-ups (~9 ms) to
# close from mid-document; the time bound keeps a lexer-heavy grammar's walk from stalling every slot.
DECODE_WALK_MASKS = 48
DECODE_WALK_SECONDS = 0.05


def shortest_completion(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, limit: int,
                        position: "_JsonPosition | None" = None, max_masks: int = MAX_WALK_MASKS,
                        hints: WalkHints = NO_HINTS, seconds: float | None = None) -> list[int] | None:
    """Tokens that take ``matcher`` (not modified) to a complete value, found greedily; None if the
    walk finds none within ``limit`` tokens. See ``walk_to_completion``."""
    path, status = walk_to_completion(matcher, tokenizer, limit, position, max_masks, hints, seconds)
    return path if status == "complete" else None


def walk_to_completion(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, limit: int,
                       position: "_JsonPosition | None" = None, max_masks: int = MAX_WALK_MASKS,
                       hints: WalkHints = NO_HINTS, seconds: float | None = None) -> tuple[list[int], str]:
    """A short way from ``matcher``'s state (not modified) to a complete value: ``(tokens, status)``.

    Status "complete": ``tokens`` (at most ``limit``) complete the value. "long": the completion
    needs more than ``limit`` tokens (the structure itself needs more; ``tokens`` is its first
    ``limit``). "stuck": it found no way on (a string whose pattern it could not satisfy, or too many
    look-ups). The walk goes on past ``limit`` (to twice it) and then writes what it found in the
    tokenizer's own tokens (``_compact``) before it compares.

    Each step takes the forced tokens if there are any, else the first preferred token the grammar
    allows (close the string, the array, the object; else the shortest value), else the lowest
    allowed token id. Optional members and items are never opened (closing is preferred wherever it
    is allowed) and required ones get minimal values. Greedy, so an upper bound on the shortest:
    exact on most schemas, longer where choosing a branch early would have paid off later.
    ``position`` is where the text so far stands (None: at the start). ``hints`` (``_string_hints``):
    whole string contents tried first inside a string value, fewest tokens first, and names tried
    first inside a key, wherever the string cannot end yet.
    """
    path, status = _walk(matcher, tokenizer, 2 * limit + 16, position, max_masks, hints, seconds)
    if status == "complete":
        path = _compact(matcher, tokenizer, path)
        if len(path) > limit:
            status = "long"
    elif len(path) > limit and len(tokenizer.tokenize_bytes(_text(tokenizer, path))) > limit:
        status = "long"  # even what it wrote so far, in the tokenizer's own tokens, is over the limit
    if status == "long":
        path = path[:limit]
    return path, status


def _text(tokenizer: llguidance.LLTokenizer, path: list[int]) -> bytes:
    return b"".join(_facts(tokenizer).token_bytes[t] for t in path)


def _compact(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, path: list[int]) -> list[int]:
    """``path``'s text in the tokenizer's own (fewest) tokens, where the grammar takes them.

    The walk writes closers one character at a time wherever a member or item could still follow
    ("}" then "]", not "}]"): on a recursive schema nested 40 levels deep that is over twice the
    tokens the model, or the tokenizer, would use, and a walk that long looked like it would not fit.
    """
    short = tokenizer.tokenize_bytes(_text(tokenizer, path))
    if len(short) >= len(path):
        return path
    m = matcher.deep_copy()
    return short if m.consume_tokens(short) and m.is_accepting() else path


def _walk(matcher: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, limit: int,
          position: "_JsonPosition | None", max_masks: int, hints: WalkHints,
          seconds: float | None) -> tuple[list[int], str]:
    facts = _facts(tokenizer)
    deadline = None if seconds is None else time.perf_counter() + seconds
    m = matcher.deep_copy()
    path: list[int] = []
    # Inside a string with a format or pattern, a preferred token may be allowed as text forever
    # ("}}}}" in an email's local part): within one string a token already chosen twice is passed
    # over, so the walk tries other characters until one moves the string toward its end.
    recent: collections.Counter[int] = collections.Counter()
    pos = _JsonPosition() if position is None else position.copy()
    masks, hinted = 0, -1  # hints are tried once per string: the serial (pos.strings) of the last one
    while not m.is_accepting():
        if m.is_stopped():
            return path, "stuck"
        if deadline is not None and time.perf_counter() > deadline:
            return path, "stuck"  # out of time: unknown
        if len(path) >= limit:  # looping in a string (it repeats itself) or simply long
            return path, "stuck" if pos.in_string and any(n >= 2 for n in recent.values()) else "long"
        forced = m.compute_ff_tokens()
        if forced:
            if not m.consume_tokens(forced):
                return path, "stuck"
            path.extend(forced)
            for t in forced:
                pos.feed(facts.token_bytes[t])
            recent.clear()
            continue
        if (pos.in_string and hinted != pos.strings and (hints.keys or not pos.in_key)
                and m.validate_tokens([facts.preferred[0]]) == 0):  # only where the string cannot end now
            hinted = pos.strings  # once per string: a hint that does not fit now will not later
            if pos.in_key:  # only a name the open object does not have yet, and only as a whole key
                keys = pos.open_keys() or set()
                hint = _first_fitting(m, tokenizer, [k for k in hints.keys if k[:-1] not in keys],
                                      bytes(pos.string_text), fresh=False)
            else:
                written = bytes(pos.string_text)
                hint = _first_fitting(m, tokenizer, hints.values + _fillers(hints.lengths, written), written)
            if hint is not None:
                path.extend(hint)
                for t in hint:
                    pos.feed(facts.token_bytes[t])
                recent.clear()
                continue
        order = facts.preferred if pos.in_string else facts.outside
        token = next((t for t in order if recent[t] < 2 and not _repeats_key(pos, facts, t)
                      and m.try_consume_tokens([t]) == 1), None)
        if token is None:
            masks += 1
            allowed = _allowed_ids(m, tokenizer.vocab_size) if masks <= max_masks else []
            allowed = [int(t) for t in allowed if t != facts.eos and not _repeats_key(pos, facts, t)]
            if not allowed:
                return path, "stuck"
            token = next((t for t in allowed if t not in recent), allowed[0])
            if not m.consume_token(token):
                return path, "stuck"
        path.append(token)
        pos.feed(facts.token_bytes[token])
        if pos.in_string:
            recent[token] += 1
        else:
            recent.clear()
    return path, "complete"


def _fillers(lengths: Sequence[int], written: bytes) -> tuple[bytes, ...]:
    """One character repeated, to make up each minLength from what the string has (and one alone)."""
    have = len(written.decode(errors="replace"))
    return tuple(f'{c * n}"'.encode() for n in sorted({n - have for n in lengths if n > have} | {1}) for c in _FILLERS)


def _first_fitting(m: llguidance.LLMatcher, tokenizer: llguidance.LLTokenizer, hints: Sequence[bytes],
                   written: bytes, fresh: bool = True) -> list[int] | None:
    """Consume the rest of the first hint that begins with ``written`` and that the grammar takes whole;
    else a whole hint after ``written``, where the grammar takes it (JSON Schema's pattern is searched,
    not anchored: after "2021-01-13 20:30" that the model wrote, a timestamp pattern's example still
    matches, and the string can close; ``fresh=False``: not so)."""
    rests = [text[len(written):] for text in hints if text.startswith(written) and len(text) > len(written)]
    fresh_hints = [text for text in hints if not text.startswith(written)] if fresh else []
    # Fewest tokens first: the walk measures the smallest instance ("a" before "2000-01-01" where a
    # string needs only a minLength of 1), continuations of what is written before fresh hints on a tie.
    candidates = sorted((len(tokens), i, tokens) for i, tokens in enumerate(
        tokenizer.tokenize_bytes(text) for text in rests + fresh_hints))
    for _, _, hint in candidates:
        n = m.try_consume_tokens(hint)
        if n == len(hint) and not m.is_error():
            return hint
        if n:
            m.rollback(n)
    return None


def _repeats_key(pos: "_JsonPosition", facts: _VocabFacts, token: int) -> bool:
    if not pos.in_key or pos.repeated_key:
        return False
    after = pos.copy()
    after.feed(facts.token_bytes[token])
    return after.repeated_key


class _JsonPosition:
    """Where in the JSON text the output is, as far as steering needs: inside an object's key, inside
    a string, and which keys the open objects already have (the walk must not repeat one: llguidance
    allows a repeated key in an open map, the validator does not)."""

    def __init__(self) -> None:
        self._stack: list[set[bytes] | None] = []  # per open container: an object's keys, None for an array
        self.strings = 0  # strings (keys included) opened so far: tells one string from the next
        self._in_string = self._escape = self._is_key = False
        self._key = bytearray()
        self.in_key = False  # after "{" or "," in an object, up to the ":" (the key decides the value)
        self.repeated_key = False  # a key was written twice in one object
        self.string_text = bytearray()  # the open string's text so far (first 256 bytes)

    @property
    def in_string(self) -> bool:
        return self._in_string

    def open_keys(self) -> set[bytes] | None:
        """The keys the innermost open object already has (None inside an array or at the top)."""
        return self._stack[-1] if self._stack else None

    def closes_repeated_key(self, data: bytes) -> bool:
        """Would feeding ``data`` close a key the innermost object already has? (No copy: a key
        step checks thousands of tokens.)"""
        keys = self.open_keys()
        if not keys or not self.in_key:
            return False
        in_string, escape = self._in_string, self._escape
        key = bytearray(self._key) if in_string else bytearray()
        for b in data:
            if not in_string:
                if b == 0x22:
                    in_string = True
                elif b not in b" \t\r\n,":  # past the key (":"), or out of the object
                    return False
            elif escape:
                escape = False
                key.append(b)
            elif b == 0x5C:
                escape = True
                key.append(b)
            elif b == 0x22:
                return bytes(key) in keys
            else:
                key.append(b)
        return False

    def copy(self) -> "_JsonPosition":
        other = _JsonPosition()
        other._stack = [None if keys is None else set(keys) for keys in self._stack]
        other._in_string, other._escape, other._is_key = self._in_string, self._escape, self._is_key
        other._key = bytearray(self._key)
        other.in_key, other.repeated_key = self.in_key, self.repeated_key
        other.string_text = bytearray(self.string_text)
        other.strings = self.strings
        return other

    def feed(self, data: bytes) -> None:
        for b in data:
            if self._in_string:
                if len(self.string_text) < 256:
                    self.string_text.append(b)
                if self._escape:
                    self._escape = False
                elif b == 0x5C:  # backslash
                    self._escape = True
                elif b == 0x22:
                    self._in_string = False
                    if self._is_key and self._stack and self._stack[-1] is not None:
                        key = bytes(self._key)
                        self.repeated_key |= key in self._stack[-1]
                        self._stack[-1].add(key)
                    continue
                if self._is_key:
                    self._key.append(b)
            elif b == 0x22:
                self._in_string, self._is_key = True, self.in_key
                self.strings += 1
                self._key.clear()
                self.string_text.clear()
            elif b == 0x7B:  # {
                self._stack.append(set())
                self.in_key = True
            elif b == 0x5B:  # [
                self._stack.append(None)
                self.in_key = False
            elif b in (0x7D, 0x5D):  # } ]
                if self._stack:
                    self._stack.pop()
                self.in_key = False
            elif b == 0x2C:  # ,
                self.in_key = bool(self._stack) and self._stack[-1] is not None
            elif b == 0x3A:  # :
                self.in_key = False
