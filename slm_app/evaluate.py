"""Measuring a model: perplexity of a text, ROUGE-L against references, behavioural checks.

Everything runs through the serving core: scoring through the engine's ``capabilities.logits`` (a
local engine's scheduler runs it
between requests, with every slot idle), generations through ``GenerationService.start`` like any
other request. Each evaluation is a generator that yields after every chunk or item, so a caller can
show progress and stop it between two steps (the Evaluate tab's Stop button, Ctrl-C in the CLI).

Perplexity, two ways:

* ``chunks`` (llama.cpp's ``llama-perplexity``): the text's tokens (with BOS when the model adds one)
  cut into non-overlapping ``ctx``-token chunks, a partial last chunk dropped; each chunk starts with
  BOS (its first token replaced, when the model uses BOS) and only the second half of each chunk is
  scored, so every scored token has at least ``ctx/2`` tokens of context. Needs ``2*ctx`` tokens.
* ``sliding`` (Hugging Face's "perplexity of fixed-length models", the usual way for GPT-2): windows
  of ``ctx`` tokens moving by ``stride``; each window scores only the tokens the previous one did not,
  so every token but the first is scored once, with up to ``ctx - stride`` tokens of context.

``auto`` picks ``chunks`` on llama.cpp and ``sliding`` elsewhere. The ± figure is llama-perplexity's:
PPL times the standard error of the mean negative log-likelihood per token.

Run from CI: ``python -m slm_app.evaluate checks`` (exit status 1 when a check fails), ``... rouge
--data FILE --min-rouge 0.3``, ``... perplexity --file FILE --ctx 512 --max-ppl 30``; the model is the
one the ``SLM_*`` environment selects, as for the app.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jsonschema
import numpy as np

from slm_app.engines.base import Engine, LogitsAccess
from slm_app.errors import RequestError, raise_failure
from slm_app.service import GenerationService

METHODS = ("auto", "chunks", "sliding")
MIN_CTX = 8
MAX_TEXT_CHARS = 2_000_000  # a few MB of text: minutes of scoring on 2 cores, still cancellable
MAX_ITEMS = 500  # rows of one ROUGE / checks file
DEFAULT_CHECKS = "checks.jsonl"
DEFAULT_ROUGE = "rouge_sample.jsonl"


# ---- perplexity ---------------------------------------------------------------------------------

@dataclass
class PerplexityReport:
    method: str
    ctx: int
    stride: int | None
    tokens: int  # tokens of the text (with BOS when the model adds one)
    tokens_scored: int
    ppl: float
    ppl_error: float  # ± one standard error
    chunk_ppl: list[float] = field(default_factory=list)
    chunks_total: int = 0  # chunks (windows) the whole text takes: progress is len(chunk_ppl) of this
    model: str = ""
    done: bool = True  # False while the evaluation is still running (a partial report)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bos_token(logits: LogitsAccess) -> int | None:
    """The BOS id when the model's tokenizer puts one first (llama-perplexity's ``add_bos``), else None.
    Two texts that share no token can share a first token only if it is BOS."""
    a, b = logits.tokenize("a"), logits.tokenize("b")
    return a[0] if len(a) > 1 and len(b) > 1 and a[0] == b[0] else None


def _check_ctx(ctx: Any, limit: int) -> int | None:
    if ctx is None or ctx == "" or ctx == 0:
        return None
    if isinstance(ctx, bool) or not isinstance(ctx, (int, float, str)):
        raise RequestError(f"ctx must be a whole number, got {ctx!r}", param="ctx")
    try:
        n = float(ctx)
    except ValueError:
        raise RequestError(f"ctx must be a whole number, got {ctx!r}", param="ctx") from None
    if not n.is_integer() or not MIN_CTX <= n <= limit:
        raise RequestError(f"ctx must be a whole number from {MIN_CTX} to {limit} (the model's context), "
                           f"got {ctx}", param="ctx")
    return int(n)


def _windows(tokens: list[int], method: str, ctx: int, stride: int, bos: int | None
             ) -> list[tuple[list[int], int]]:
    """(window tokens, index into its log-probabilities from which they are scored), in text order."""
    if method == "chunks":
        first = ctx // 2
        out = []
        for i in range(len(tokens) // ctx):
            chunk = tokens[i * ctx:(i + 1) * ctx]
            if bos is not None:
                chunk[0] = bos
            # score() gives log P(chunk[j+1] | chunk[:j+1]) at j: llama-perplexity scores j >= first.
            out.append((chunk, first))
        return out
    out, prev_end = [], 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + ctx, len(tokens))
        window = tokens[begin:end]
        new = end - prev_end  # tokens this window scores that the previous one did not
        out.append((window, max(0, len(window) - 1 - new)))
        prev_end = end
        if end == len(tokens):
            break
    return out


def iter_perplexity(engine: Engine, text: Any, ctx: Any = None, method: str = "auto",
                    stride: Any = None) -> Iterator[PerplexityReport]:
    """Yields a partial report after each chunk (``done`` False), then the final one."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError("text is empty: paste or upload the text to score", param="text")
    if len(text) > MAX_TEXT_CHARS:
        raise RequestError(f"text is {len(text):,} characters; at most {MAX_TEXT_CHARS:,}", status=413, param="text")
    if method not in METHODS:
        raise RequestError(f"method must be one of {', '.join(METHODS)}, got {method!r}", param="method")
    logits = engine.capabilities.logits
    if logits is None:  # an engine without logits (a remote server): say so, clearly
        raise RequestError("perplexity is not available with this backend: perplexity needs logits, which "
                           "OpenAI-compatible servers do not return", status=400)
    info = engine.info()
    if method == "auto":
        method = "chunks" if info.backend == "llama.cpp" else "sliding"
    limit = info.n_ctx
    ctx = _check_ctx(ctx, limit) or (min(512, limit) if method == "chunks" else limit)
    step = None
    if method == "sliding":
        step = _check_ctx(stride, ctx) or max(1, ctx // 2)
    tokens = list(logits.tokenize(text))
    if method == "chunks" and len(tokens) < 2 * ctx:
        raise RequestError(f"the text is {len(tokens):,} tokens; perplexity over chunks of ctx={ctx} needs at "
                           f"least {2 * ctx:,} (llama-perplexity's rule): give more text or a smaller ctx",
                           param="text")
    if len(tokens) < 2:
        raise RequestError("the text is a single token: nothing to predict", param="text")
    windows = _windows(tokens, method, ctx, step or ctx, bos_token(logits) if method == "chunks" else None)
    nll: list[np.ndarray] = []
    chunk_ppl: list[float] = []
    for window, first in windows:
        logprobs = np.asarray(logits.score(window), dtype=np.float64)
        if logprobs.shape != (len(window) - 1,):
            raise RuntimeError(f"score() returned {logprobs.shape} log-probabilities for {len(window)} tokens")
        scored = -logprobs[first:]
        if scored.size:
            nll.append(scored)
            chunk_ppl.append(float(np.exp(scored.mean())))
        yield _report(method, ctx, step, tokens, nll, chunk_ppl, len(windows), info.model_id, done=False)
    yield _report(method, ctx, step, tokens, nll, chunk_ppl, len(windows), info.model_id, done=True)


def _report(method: str, ctx: int, stride: int | None, tokens: list[int], nll: list[np.ndarray],
            chunk_ppl: list[float], total: int, model: str, done: bool) -> PerplexityReport:
    values = np.concatenate(nll) if nll else np.zeros(0)
    count = int(values.size)
    mean = float(values.mean()) if count else math.nan
    ppl = math.exp(mean) if count else math.nan
    # llama-perplexity's estimate: sqrt((E[nll²] - E[nll]²) / (count - 1)) on the log scale, times PPL.
    var = float((values ** 2).mean() - mean ** 2) if count > 1 else 0.0
    error = ppl * math.sqrt(var / (count - 1)) if count > 1 and var > 0 else 0.0
    return PerplexityReport(method=method, ctx=ctx, stride=stride, tokens=len(tokens), tokens_scored=count,
                            ppl=ppl, ppl_error=error, chunk_ppl=list(chunk_ppl), chunks_total=total, model=model,
                            done=done)


def perplexity(engine: Engine, text: Any, ctx: Any = None, method: str = "auto", stride: Any = None
               ) -> PerplexityReport:
    report = None
    for report in iter_perplexity(engine, text, ctx, method, stride):
        pass
    assert report is not None
    return report


# ---- datasets -------------------------------------------------------------------------------------

def default_data(name: str) -> str:
    return resources.files("slm_app.data").joinpath(name).read_text(encoding="utf-8")


def parse_jsonl(text: Any, what: str, param: str = "data", max_items: int | None = MAX_ITEMS) -> list[dict[str, Any]]:
    """JSON objects, one per non-blank line (``_line``: its number); errors name the line and ``param``."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"{what}: no data: give JSONL, one JSON object per line", param=param)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{what}: line {number} is not valid JSON ({exc.msg})", param=param) from None
        if not isinstance(row, dict):
            raise RequestError(f"{what}: line {number} must be a JSON object", param=param)
        row["_line"] = number
        rows.append(row)
    if not rows:
        raise RequestError(f"{what}: no data: give JSONL, one JSON object per line", param=param)
    if max_items is not None and len(rows) > max_items:
        raise RequestError(f"{what}: {len(rows)} items; at most {max_items} per run", status=413, param=param)
    return rows


def _string_field(row: dict[str, Any], key: str, what: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{what}: line {row['_line']} needs \"{key}\" as a non-empty string", param="data")
    return value


def _generate(service: GenerationService, prompt: str, max_new_tokens: Any, temperature: Any, seed: Any) -> str:
    """One greedy (by default) answer through the service, as a Generate request would run."""
    params = service.sampling(max_new_tokens, temperature, 1.0, seed=seed)
    prepared = service.check_prompt(prompt, params.use_chat_template)
    generation = service.start("evaluate", prepared, params)
    try:
        final = generation.result()
    finally:
        generation.cancel()  # a no-op once finished; frees the slot if this evaluation was stopped
    raise_failure(final)
    return final.text.strip()


# ---- ROUGE-L ----------------------------------------------------------------------------------------

def rouge_l(reference: str, generation: str) -> dict[str, float]:
    """ROUGE-L (longest common subsequence) with Porter stemming, as the rouge-score package computes it."""
    from rouge_score import rouge_scorer

    score = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, generation)["rougeL"]
    return {"precision": score.precision, "recall": score.recall, "f1": score.fmeasure}


def iter_rouge(service: GenerationService, data: Any, max_new_tokens: Any, temperature: Any = 0.0,
               seed: Any = 0) -> Iterator[tuple[dict[str, Any], int]]:
    """Yields (row result, total rows) as each {"prompt", "reference"} is generated and scored."""
    rows = parse_jsonl(data, "ROUGE-L data")
    items = [(_string_field(r, "prompt", "ROUGE-L data"), _string_field(r, "reference", "ROUGE-L data"))
             for r in rows]
    service.sampling(max_new_tokens, temperature, 1.0, seed=seed)  # refuse bad settings before any work
    for prompt, reference in items:
        generation = _generate(service, prompt, max_new_tokens, temperature, seed)
        yield {"prompt": prompt, "reference": reference, "generation": generation,
               **{f"rougeL_{k}": round(v, 4) for k, v in rouge_l(reference, generation).items()}}, len(items)


def rouge_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scores = [r["rougeL_f1"] for r in results]
    return {"kind": "rouge", "items": len(results), "rougeL_f1_mean": round(float(np.mean(scores)), 4) if scores else None}


# ---- behavioural checks --------------------------------------------------------------------------------

EXPECTATIONS = ("contains", "not_contains", "regex", "json_schema", "max_chars")


@dataclass(frozen=True)
class Check:
    name: str
    prompt: str
    expect: dict[str, Any]
    max_new_tokens: int | None = None


def parse_checks(data: Any) -> list[Check]:
    rows = parse_jsonl(data, "checks")
    checks = []
    for row in rows:
        line = row["_line"]
        prompt = _string_field(row, "prompt", "checks")
        expect = row.get("expect")
        if not isinstance(expect, dict) or not expect:
            raise RequestError(f"checks: line {line} needs \"expect\": an object with any of {', '.join(EXPECTATIONS)}",
                               param="data")
        unknown = set(expect) - set(EXPECTATIONS)
        if unknown:
            raise RequestError(f"checks: line {line}: unknown expectation {sorted(unknown)[0]!r} "
                               f"(use {', '.join(EXPECTATIONS)})", param="data")
        for key in ("contains", "not_contains"):
            if key in expect:
                value = expect[key]
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                    raise RequestError(f"checks: line {line}: {key} must be a string or a list of strings",
                                       param="data")
                expect = {**expect, key: value}
        if "regex" in expect:
            try:
                re.compile(expect["regex"])
            except (re.error, TypeError) as exc:
                raise RequestError(f"checks: line {line}: regex does not compile ({exc})", param="data") from None
        if "json_schema" in expect:
            try:
                jsonschema.validators.validator_for(expect["json_schema"]).check_schema(expect["json_schema"])
            except jsonschema.SchemaError as exc:
                raise RequestError(f"checks: line {line}: json_schema is not a valid schema ({exc.message})",
                                   param="data") from None
        if "max_chars" in expect and (isinstance(expect["max_chars"], bool) or not isinstance(expect["max_chars"], int)
                                      or expect["max_chars"] < 0):
            raise RequestError(f"checks: line {line}: max_chars must be a whole number >= 0", param="data")
        tokens = row.get("max_new_tokens")
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)):
            raise RequestError(f"checks: line {line}: max_new_tokens must be a whole number", param="data")
        checks.append(Check(name=str(row.get("name") or f"line {line}"), prompt=prompt, expect=expect,
                            max_new_tokens=tokens))
    return checks


def _json_in(text: str) -> Any:
    """The JSON value the output is, or else the outermost {...} / [...] inside it (chatty models)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        start = min(starts)
        end = text.rfind("}" if text[start] == "{" else "]")
        if end > start:
            return json.loads(text[start:end + 1])
    raise json.JSONDecodeError("no JSON value found", text, 0)


def judge(output: str, expect: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """(expectation, passed, why) for each expectation of a check."""
    results = []
    lowered = output.lower()
    for needle in expect.get("contains", []):
        ok = needle.lower() in lowered
        results.append((f"contains {needle!r}", ok, "found" if ok else "not in the output"))
    for needle in expect.get("not_contains", []):
        ok = needle.lower() not in lowered
        results.append((f"does not contain {needle!r}", ok, "absent" if ok else "found in the output"))
    if "regex" in expect:
        match = re.search(expect["regex"], output)
        results.append((f"matches /{expect['regex']}/", bool(match),
                        f"matched {match.group(0)[:40]!r}" if match else "no match"))
    if "json_schema" in expect:
        try:
            value = _json_in(output)
            error = next(iter(jsonschema.validators.validator_for(expect["json_schema"])(
                expect["json_schema"]).iter_errors(value)), None)
            ok, why = error is None, "valid" if error is None else f"invalid: {error.message[:120]}"
        except json.JSONDecodeError as exc:
            ok, why = False, f"not JSON ({exc.msg})"
        results.append(("valid against the JSON Schema", ok, why))
    if "max_chars" in expect:
        ok = len(output) <= expect["max_chars"]
        results.append((f"at most {expect['max_chars']} characters", ok, f"{len(output)} characters"))
    return results


def iter_checks(service: GenerationService, data: Any, max_new_tokens: Any, temperature: Any = 0.0,
                seed: Any = 0) -> Iterator[tuple[dict[str, Any], int]]:
    """Yields (check result, total checks) as each check's prompt is answered and judged."""
    checks = parse_checks(data)
    service.sampling(max_new_tokens, temperature, 1.0, seed=seed)
    cap = service.limits.max_new_tokens
    for check in checks:
        tokens = min(check.max_new_tokens, cap) if check.max_new_tokens else max_new_tokens
        output = _generate(service, check.prompt, tokens, temperature, seed)
        verdicts = judge(output, check.expect)
        yield {"name": check.name, "passed": all(ok for _, ok, _ in verdicts), "prompt": check.prompt,
               "output": output,
               "details": "; ".join(f"{'✓' if ok else '✗'} {what}: {why}" for what, ok, why in verdicts)}, len(checks)


def checks_summary(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    passed = sum(r["passed"] for r in results)
    return {"kind": "checks", "items": len(results), "passed": passed, "failed": len(results) - passed}


# ---- the CLI ---------------------------------------------------------------------------------------------

def _read(path: str | None, fallback: Callable[[], str] | None = None) -> str:
    if path is None:
        if fallback is None:
            raise SystemExit("give --file / --data")
        return fallback()
    return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], width: int = 48) -> str:
    def cell(v: Any) -> str:
        s = str(v).replace("\n", " ")
        return s if len(s) <= width else s[: width - 1] + "…"

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slm_app.evaluate",
                                     description="Evaluate the model the SLM_* environment selects.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("perplexity", help="perplexity of a text file")
    p.add_argument("--file", required=True, help="text file ('-' for stdin)")
    p.add_argument("--ctx", type=int, default=None, help="chunk / window length in tokens")
    p.add_argument("--method", choices=METHODS, default="auto")
    p.add_argument("--stride", type=int, default=None, help="sliding window step (default ctx/2)")
    p.add_argument("--max-ppl", type=float, default=None, help="exit 1 when the perplexity is above this")
    for name, helptext in (("rouge", "ROUGE-L of generations against references"),
                           ("checks", "behavioural checks (default: the set shipped with the app)")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--data", default=None, help="JSONL file ('-' for stdin)")
        q.add_argument("--max-new-tokens", type=int, default=None, help="default: the tier's limit")
        q.add_argument("--temperature", type=float, default=0.0)
        q.add_argument("--seed", type=int, default=0)
        if name == "rouge":
            q.add_argument("--min-rouge", type=float, default=None, help="exit 1 when the mean F1 is below this")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    from slm_app.settings import load_settings

    service = GenerationService(load_settings())
    service.load()
    if service.engine is None:
        print(f"model not loaded: {service.load_error}", file=sys.stderr)
        return 2
    try:
        return _run(service, args)
    except RequestError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    finally:
        service.close()


def _run(service: GenerationService, args: argparse.Namespace) -> int:
    if args.command == "perplexity":
        report = perplexity(service.ready(), _read(args.file), args.ctx, args.method, args.stride)
        if args.json:
            print(json.dumps(report.to_dict(), indent=2))
        else:
            print(f"{report.model}: PPL = {report.ppl:.4f} +/- {report.ppl_error:.5f} ({report.method}, "
                  f"ctx {report.ctx}, {report.tokens_scored} tokens scored in {len(report.chunk_ppl)} chunks)")
        return 1 if args.max_ppl is not None and not report.ppl <= args.max_ppl else 0
    tokens = args.max_new_tokens or service.limits.max_new_tokens
    if args.command == "rouge":
        results = [r for r, _ in iter_rouge(service, _read(args.data, lambda: default_data(DEFAULT_ROUGE)),
                                            tokens, args.temperature, args.seed)]
        summary = rouge_summary(results)
        print(json.dumps({"summary": summary, "results": results}, indent=2, ensure_ascii=False) if args.json
              else _table(results, ["prompt", "generation", "rougeL_f1"]) + f"\nmean ROUGE-L F1: {summary['rougeL_f1_mean']}")
        return 1 if args.min_rouge is not None and not summary["rougeL_f1_mean"] >= args.min_rouge else 0
    results = [r for r, _ in iter_checks(service, _read(args.data, lambda: default_data(DEFAULT_CHECKS)),
                                         tokens, args.temperature, args.seed)]
    summary = checks_summary(results)
    print(json.dumps({"summary": summary, "results": results}, indent=2, ensure_ascii=False) if args.json
          else _table([{**r, "passed": "PASS" if r["passed"] else "FAIL"} for r in results],
                      ["name", "passed", "details"], width=70) + f"\n{summary['passed']}/{summary['items']} passed")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
