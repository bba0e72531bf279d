"""How much of the real JSON Schema world the structured-output engine covers, and at what cost.

    .venv/bin/python bench/structured_coverage.py [--backend tf|llama] [--limit N] [--max-tokens N]
                                                  [--schemas DIR] [--model ID] [--attempts N] [--json OUT]

Runs ``slm_app.structured.generate_structured`` (the app's path: intake, compile ladder,
constrained decode, jsonschema, retries) on each schema of ../shared/schemas/jsonschemabench-dev,
with the tier's limits (tf: free tier, tiny-gpt2; llama: pro tier, default model or the embedded
Gemma 3 270M). ``--limit`` takes schemas round-robin across subsets, so every subset is sampled.

Per subset: how many schemas compile strictly / only relaxed / are refused (intake or compile);
how many yield output that validates; how many are at least answered precisely (valid output or a
refusal naming the reason); outputs reported valid that an independent plain-jsonschema check
rejects (must be 0); compile ms (median, p95; first, uncached compile including failed rungs);
and decode tokens/s after the first token with the constraint vs without it, same prompt, same
token budget.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slm_app import structured  # noqa: E402
from slm_app.backends.base import Backend, GeneratedSequence, SamplingParams  # noqa: E402
from slm_app.settings import TIER_PROFILES, Settings, Tier  # noqa: E402

DEFAULT_SCHEMAS = Path(__file__).resolve().parents[1] / ".." / "shared" / "schemas" / "jsonschemabench-dev"
PROMPT = "Write one realistic example document for the schema below."


class TimedBackend(Backend):
    """Delegates to a real backend and adds up decode time and tokens after the first token.

    Prefill is left out on purpose: constrained outputs usually end well before the budget while
    unconstrained ones run to it, so counting the fixed prompt cost would penalise the shorter run.
    """

    def __init__(self, inner: Backend):
        self.inner, self.name, self.model_id = inner, inner.name, inner.model_id
        self.seconds, self.tokens = 0.0, 0

    def decode(self, prompts: Sequence[str], params: SamplingParams, constraints=None,
               cancel=None) -> Iterator[list[GeneratedSequence]]:
        first, seqs = None, []
        try:
            for seqs in self.inner.decode(prompts, params, constraints=constraints, cancel=cancel):
                first = first or time.perf_counter()
                yield seqs
        finally:
            if first is not None:
                self.seconds += time.perf_counter() - first
                self.tokens += max(sum(s.completion_tokens for s in seqs) - len(seqs), 0)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def llguidance_tokenizer(self) -> Any:
        return self.inner.llguidance_tokenizer()

    @property
    def vocab_width(self) -> int:
        return self.inner.vocab_width

    def info(self) -> dict[str, Any]:
        return self.inner.info()


def load_backend(kind: str, model: str | None) -> tuple[Backend, Any]:
    tier = Tier.free if kind == "tf" else Tier.pro
    profile = TIER_PROFILES[tier]
    settings = Settings(tier=tier, model=model)
    if kind == "tf":
        from slm_app.backends.tf_gpt2 import TFGPT2Backend as cls
    else:
        from slm_app.backends.llama_cpp_backend import LlamaCppBackend as cls
    return cls.load(profile, settings, model or profile.model), profile.limits


def pick_schemas(root: Path, limit: int | None) -> list[Path]:
    """Round-robin over subsets (each sorted by name): any --limit samples every subset."""
    subsets = [sorted(Path(d).glob("*.json")) for d in sorted(glob.glob(str(root / "*"))) if os.path.isdir(d)]
    order = [files[i] for i in range(max(map(len, subsets), default=0)) for files in subsets if i < len(files)]
    return order[:limit] if limit else order


def independent_check(raw: str, schema: dict) -> bool:
    """Plain jsonschema (own draft, format checks, nothing fetched), not the engine's code path."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER, registry=structured.NO_FETCH_REGISTRY)
    return validator.is_valid(json.loads(raw))


def run_one(backend: TimedBackend, path: Path, limits: Any, max_tokens: int, attempts: int) -> dict[str, Any]:
    case = json.loads(path.read_text())
    text = json.dumps(case["schema"])
    row: dict[str, Any] = {"subset": path.parent.name, "schema": path.name}
    try:
        schema = structured.parse_schema(text, limits)
    except structured.SchemaError as exc:
        return {**row, "outcome": "refused", "reason": str(exc)}
    start = time.perf_counter()
    try:
        compiled = structured.compile_schema(schema, backend.llguidance_tokenizer())
    except structured.SchemaError as exc:
        compiled, row["reason"] = None, str(exc)
    row["compile_ms"] = 1000 * (time.perf_counter() - start)
    if compiled is None:
        return {**row, "outcome": "uncompilable"}
    row["mode"] = compiled.mode

    backend.seconds = backend.tokens = 0
    try:
        result = structured.generate_structured(backend, PROMPT, text, limits=limits, max_new_tokens=max_tokens,
                                                temperature=0.7, seed=0, attempts=attempts)
    except Exception as exc:  # a backend failure is a finding to report, not a reason to lose the run
        return {**row, "outcome": "error", "reason": f"{type(exc).__name__}: {exc}"}
    row.update(constrained_s=backend.seconds, constrained_tokens=backend.tokens, tokens=result.tokens)
    if result.success:
        row.update(outcome="valid", false_valid=not independent_check(result.raw_text, schema))
    else:
        row.update(outcome="truncated" if result.error.startswith("truncated") else "invalid", reason=result.error)

    # The same prompt the engine built, without the constraint, for the speed comparison.
    backend.seconds = backend.tokens = 0
    prompt = structured.build_prompt(backend, PROMPT, compiled.schema, limits)
    backend.generate([prompt], SamplingParams(max_new_tokens=max_tokens, temperature=0.7, seed=0))
    return {**row, "free_s": backend.seconds, "free_tokens": backend.tokens}


def pct(n: int, d: int) -> str:
    return f"{100 * n / d:.0f}%" if d else "-"


def summary_row(name: str, rows: list[dict[str, Any]]) -> list[str]:
    n = len(rows)
    count = collections.Counter(r["outcome"] for r in rows)
    modes = collections.Counter(r.get("mode") for r in rows)
    ms = [r["compile_ms"] for r in rows if "compile_ms" in r]
    timed = [r for r in rows if "free_s" in r]
    c_tps = sum(r["constrained_tokens"] for r in timed) / max(sum(r["constrained_s"] for r in timed), 1e-9)
    f_tps = sum(r["free_tokens"] for r in timed) / max(sum(r["free_s"] for r in timed), 1e-9)
    refused = count["refused"] + count["uncompilable"]
    return [name, str(n), pct(modes["strict"], n), pct(n - modes["strict"] - modes[None], n), pct(refused, n),
            pct(count["valid"], n), pct(count["valid"] + refused, n), pct(count["truncated"], n),
            pct(count["invalid"], n), str(sum(bool(r.get("false_valid")) for r in rows)),
            f"{statistics.median(ms):.1f}" if ms else "-",
            f"{statistics.quantiles(ms, n=20)[-1]:.1f}" if len(ms) > 1 else "-",
            f"{c_tps:.0f}" if timed else "-", f"{f_tps:.0f}" if timed else "-"]


HEADER = ["subset", "schemas", "strict", "relaxed", "refused", "valid output", "valid or refused", "truncated",
          "invalid", "reported valid but invalid", "compile ms p50", "compile ms p95", "tok/s constrained",
          "tok/s free"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["tf", "llama"], default="tf")
    ap.add_argument("--limit", type=int, help="schemas to run (default: all)")
    ap.add_argument("--max-tokens", type=int, help="token budget per output (default: the tier's structured cap)")
    ap.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS)
    ap.add_argument("--model", help="model id or path (default: the tier's model)")
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()

    inner, limits = load_backend(args.backend, args.model)
    backend = TimedBackend(inner)
    backend.llguidance_tokenizer()  # built once (~1 s) here, not inside the first schema's compile time
    max_tokens = args.max_tokens or limits.max_structured_tokens
    limits = limits.model_copy(update={"max_structured_tokens": max(max_tokens, limits.max_structured_tokens)})
    paths = pick_schemas(args.schemas, args.limit)
    print(f"{len(paths)} schemas, backend {args.backend} ({inner.model_id}), max {max_tokens} tokens, "
          f"{args.attempts} attempts, schema limit {limits.max_schema_chars:,} chars / depth {limits.max_schema_depth}",
          file=sys.stderr)
    rows = []
    for i, path in enumerate(paths, 1):
        rows.append(run_one(backend, path, limits, max_tokens, args.attempts))
        print(f"[{i}/{len(paths)}] {path.parent.name}/{path.name}: {rows[-1]['outcome']}", file=sys.stderr)

    by_subset: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        by_subset[row["subset"]].append(row)
    table = [summary_row(name, group) for name, group in sorted(by_subset.items())] + [summary_row("all", rows)]
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    for line in table:
        print("| " + " | ".join(line) + " |")
    reasons = collections.Counter(f"{r['outcome']}: {r['reason'][:110]}" for r in rows if "reason" in r
                                  and r["outcome"] != "truncated")
    for reason, n in reasons.most_common():
        print(f"- {n} × {reason}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
