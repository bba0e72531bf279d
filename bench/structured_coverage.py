"""How much of the real JSON Schema world the structured-output engine covers, and at what cost.

    .venv/bin/python bench/structured_coverage.py [--tier free|standard|pro] [--backend fake|tensorflow|llama.cpp]
        [--model ID] [--limit N] [--max-tokens N] [--schemas DIR] [--attempts N] [--json OUT]
        [--jobs N] [--speed-every K] [--seed S]

Runs each schema of ../shared/schemas/jsonschemabench-dev through the app's own path: a
``GenerationService`` (tier limits, the scheduler, its slots and sampler) and
``slm_app.structured.generate_structured`` on the service's runner (intake, compile ladder,
budget-steered constrained decode, jsonschema, retries). The backend and model are the tier's unless
``--backend``/``--model`` say otherwise (``--backend fake``: the scripted test model, which under a
JSON constraint behaves like a random one). ``--limit`` takes schemas round-robin across subsets, so
every subset is sampled.

Per subset: schemas compiled strictly / only relaxed / refused (intake, compile, or a smallest
instance longer than the budget); how many yield output that validates; how many are at least
answered precisely (valid output or a refusal naming the reason); truncated and invalid outputs;
outputs reported valid that an independent plain-jsonschema check rejects (must be 0); valid outputs
lost to serialization (the result as the Structured JSON endpoint sends it, ``json_output.json_text``,
read back and compared: must be 0) and valid outputs with numbers outside the interoperable range
(within ±(2^53-1), at most 6 decimals, checked on the text here: must be 0); compile ms
(first, uncached compile: every rung tried plus the walk to the smallest instance; p50, p95; the
walk's own p50 beside); the constraint's own time per decode step (mask, steering, consume); and
decode tokens/s after the first token with the constraint vs without it, same prompt, same budget,
interleaved schema by schema (``--speed-every K``: on every K-th schema only, since an unconstrained
run goes to the budget; ``--jobs N``: N schemas at once through the service's slots, for coverage on
slow models; the speed columns are then left out, as neighbours share the CPU).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slm_app import structured  # noqa: E402
from slm_app.ui.json_output import json_text  # noqa: E402
from slm_app.backends.base import SamplingParams, TokenConstraint  # noqa: E402
from slm_app.scheduler import Completion  # noqa: E402
from slm_app.service import GenerationService, ServiceRunner  # noqa: E402
from slm_app.settings import Settings  # noqa: E402
from slm_app.structured.validation import NO_FETCH_REGISTRY  # noqa: E402

DEFAULT_SCHEMAS = Path(__file__).resolve().parents[1] / ".." / "shared" / "schemas" / "jsonschemabench-dev"
PROMPT = "Write one realistic example document for the schema below."


class TimedConstraint:
    """Times the constraint's own work (mask, steering walks, consume) per decode step."""

    def __init__(self, inner: TokenConstraint, clock: "TimedRunner"):
        self.inner, self.clock = inner, clock

    def allowed_tokens(self, remaining: int) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.allowed_tokens(remaining)
        finally:
            self.clock.mask_s += time.perf_counter() - start
            self.clock.steps += 1

    def consume(self, token_id: int) -> None:
        start = time.perf_counter()
        self.inner.consume(token_id)
        self.clock.mask_s += time.perf_counter() - start

    def forced_tokens(self) -> list[int]:
        start = time.perf_counter()
        try:
            return self.inner.forced_tokens()
        finally:
            self.clock.mask_s += time.perf_counter() - start

    def is_finished(self) -> bool:
        return self.inner.is_finished()


class TimedRunner:
    """The service's structured runner, adding up decode time and tokens after each first token.

    Prefill is left out on purpose: constrained outputs usually end well before the budget while
    unconstrained ones run to it, so counting the fixed prompt cost would penalise the shorter run.
    """

    def __init__(self, inner: ServiceRunner):
        self.inner, self.model_id = inner, inner.model_id
        self.max_sequence_tokens = inner.max_sequence_tokens
        self.seconds, self.tokens = 0.0, 0
        self.mask_s, self.steps = 0.0, 0

    def schema_plan(self, schema: dict, budget: int, steer: bool = True) -> Any:
        return self.inner.schema_plan(schema, budget, steer)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 constraints: Sequence[TokenConstraint]) -> list[Completion]:
        out = self.inner.generate(prompts, params, [TimedConstraint(c, self) for c in constraints])
        for final in out:
            self.add(final)
        return out

    def add(self, final: Completion) -> None:
        if final.ttft_s is not None and final.completion_tokens > 1:
            self.seconds += final.elapsed_s - final.ttft_s
            self.tokens += final.completion_tokens - 1


def pick_schemas(root: Path, limit: int | None) -> list[Path]:
    """Round-robin over subsets (each sorted by name): any --limit samples every subset."""
    subsets = [sorted(Path(d).glob("*.json")) for d in sorted(glob.glob(str(root / "*"))) if os.path.isdir(d)]
    order = [files[i] for i in range(max(map(len, subsets), default=0)) for files in subsets if i < len(files)]
    return order[:limit] if limit else order


def independent_check(raw: str, schema: dict) -> bool:
    """Plain jsonschema (own draft, format checks, nothing fetched), not the engine's code path."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER, registry=NO_FETCH_REGISTRY)
    return validator.is_valid(json.loads(raw))


def lost_in_transit(result: structured.StructuredResult) -> bool:
    """The result as the Structured JSON endpoint sends it, read back: is anything lost or changed?"""
    try:
        return json.loads(json_text(result.to_api()))["data"] != result.data
    except Exception:  # noqa: BLE001 - any failure to write it is a lost result
        return True


def interoperable(raw: str) -> bool:
    """Every number as written: within ±(2^53-1) and at most 6 decimals (independent of json_numbers)."""
    from decimal import Decimal

    ok = [True]

    def number(text: str) -> int:
        d = Decimal(text)
        ok[0] &= d.is_finite() and abs(d) <= 2**53 - 1 and (d == d.to_integral_value()
                                                              or d.normalize().as_tuple().exponent >= -6)
        return 0

    json.loads(raw, parse_int=number, parse_float=number)
    return ok[0]


def run_one(service: GenerationService, path: Path, max_tokens: int, attempts: int, steer: bool = True,
            speed: bool = True, seed: int = 0) -> dict[str, Any]:
    limits = service.limits
    runner = TimedRunner(ServiceRunner(service, None))
    case = json.loads(path.read_text())
    text = json.dumps(case["schema"])
    row: dict[str, Any] = {"subset": path.parent.name, "schema": path.name, "chars": len(text)}
    try:
        schema = structured.parse_schema(text, limits)
    except structured.SchemaError as exc:
        return {**row, "outcome": "refused", "reason": f"intake: {exc}"}
    start = time.perf_counter()
    try:
        compiled = structured.compile_schema(schema, service.ready().capabilities.logits.llguidance_tokenizer(),
                                             budget=max_tokens)
    except structured.SchemaError as exc:
        compiled, row["reason"] = None, str(exc)
    row["compile_ms"] = 1000 * (time.perf_counter() - start)
    if compiled is None:
        return {**row, "outcome": "uncompilable"}
    row.update(mode=compiled.mode, min_tokens=compiled.min_tokens, grammar_ms=compiled.compile_ms,
               walk_ms=compiled.walk_ms)

    runner.seconds = runner.tokens = runner.steps = 0
    runner.mask_s = 0.0
    try:
        result = structured.generate_structured(runner, PROMPT, text, limits=limits, max_new_tokens=max_tokens,
                                                temperature=0.7, seed=seed, attempts=attempts, steer=steer)
    except structured.SchemaError as exc:  # the smallest instance does not fit the budget
        return {**row, "outcome": "refused", "reason": str(exc)}
    except Exception as exc:  # a backend failure is a finding to report, not a reason to lose the run
        return {**row, "outcome": "error", "reason": f"{type(exc).__name__}: {exc}"}
    row.update(constrained_s=runner.seconds, constrained_tokens=runner.tokens, tokens=result.tokens,
               mask_s=runner.mask_s, mask_steps=runner.steps)
    if result.success:
        row.update(outcome="valid", false_valid=not independent_check(result.raw_text, schema),
                   lost=lost_in_transit(result), not_interoperable=not interoperable(result.raw_text))
    else:
        row.update(outcome="truncated" if result.outcome is structured.Outcome.TRUNCATED else "invalid",
                   reason=result.error)
    if not speed:
        return row

    # The same prompt the engine built, without the constraint, for the speed comparison.
    runner.seconds = runner.tokens = 0
    prompt = structured.build_prompt(runner, PROMPT, compiled.schema, limits, max_tokens)
    prepared = service.prepare(service.ready().format_prompt(prompt, True))
    runner.add(service.start("bench", prepared, SamplingParams(max_new_tokens=max_tokens, temperature=0.7,
                                                                seed=seed)).result())
    return {**row, "free_s": runner.seconds, "free_tokens": runner.tokens}


def pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else "-"


def summary_row(name: str, rows: list[dict[str, Any]]) -> list[str]:
    n = len(rows)
    count = collections.Counter(r["outcome"] for r in rows)
    modes = collections.Counter(r.get("mode") for r in rows)
    ms = [r["compile_ms"] for r in rows if "compile_ms" in r]
    walk = [r["walk_ms"] for r in rows if "walk_ms" in r]
    timed = [r for r in rows if "free_s" in r]
    c_tps = sum(r["constrained_tokens"] for r in timed) / max(sum(r["constrained_s"] for r in timed), 1e-9)
    f_tps = sum(r["free_tokens"] for r in timed) / max(sum(r["free_s"] for r in timed), 1e-9)
    refused = count["refused"] + count["uncompilable"]
    return [name, str(n), pct(modes["strict"], n), pct(n - modes["strict"] - modes[None], n), pct(refused, n),
            pct(count["valid"], n), pct(count["valid"] + refused, n), pct(count["truncated"], n),
            pct(count["invalid"] + count["error"], n), str(sum(bool(r.get("false_valid")) for r in rows)),
            str(sum(bool(r.get("lost")) for r in rows)), str(sum(bool(r.get("not_interoperable")) for r in rows)),
            f"{statistics.median(ms):.1f}" if ms else "-",
            f"{statistics.quantiles(ms, n=20)[-1]:.1f}" if len(ms) > 1 else "-",
            f"{statistics.median(walk):.1f}" if walk else "-",
            f"{c_tps:.0f}" if timed else "-", f"{f_tps:.0f}" if timed else "-",
            f"{c_tps / f_tps:.2f}" if timed and f_tps else "-",
            f"{1000 * sum(r['mask_s'] for r in timed) / max(sum(r['mask_steps'] for r in timed), 1):.2f}"
            if timed else "-"]


HEADER = ["subset", "schemas", "strict", "relaxed", "refused", "valid output", "valid or refused", "truncated",
          "invalid", "reported valid but invalid", "lost to serialization",
          "non-interoperable numbers", "compile ms p50", "compile ms p95", "of which walk ms p50",
          "tok/s constrained",
          "tok/s free", "ratio", "constraint ms/step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", choices=["free", "standard", "pro"], default="free")
    ap.add_argument("--backend", choices=["fake", "tensorflow", "llama.cpp"], help="default: the tier's")
    ap.add_argument("--model", help="model id, path or embedded:<name> (default: the tier's)")
    ap.add_argument("--limit", type=int, help="schemas to run (default: all)")
    ap.add_argument("--max-tokens", type=int, help="token budget per output (default: the tier's structured cap)")
    ap.add_argument("--schemas", type=Path, default=DEFAULT_SCHEMAS)
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write every row here")
    ap.add_argument("--no-steer", action="store_true", help="budget steering off (what it adds, for comparison)")
    ap.add_argument("--jobs", type=int, default=1, help="schemas at once (slots); >1 leaves the speed columns out")
    ap.add_argument("--speed-every", type=int, default=1, help="unconstrained comparison on every K-th schema")
    ap.add_argument("--seed", type=int, default=0, help="first sampling seed (attempt i uses seed + i)")
    args = ap.parse_args()

    overrides = {"max_structured_tokens": args.max_tokens} if args.max_tokens else {}
    settings = Settings(tier=args.tier, backend=args.backend, model=args.model, parallel=args.jobs, **overrides)
    service = GenerationService(settings)
    service.load()
    if service.status != "ok":
        sys.exit(f"model not loaded: {service.load_error}")
    runner = ServiceRunner(service, None)
    service.ready().capabilities.logits.llguidance_tokenizer()  # built once (~1 s), not in the first compile
    max_tokens = service.limits.max_structured_tokens
    paths = pick_schemas(args.schemas, args.limit)
    lim = service.limits
    print(f"{len(paths)} schemas, seed {args.seed}, steering {'off' if args.no_steer else 'on'}, tier {args.tier}, backend {service.tier.backend} ({runner.model_id}), "
          f"max {max_tokens} tokens, {args.attempts} attempts, schema limit {lim.max_schema_chars:,} chars / "
          f"depth {lim.max_schema_depth}, {args.jobs} at once", file=sys.stderr)
    rows: list[dict[str, Any]] = []

    def one(i: int, path: Path) -> dict[str, Any]:
        speed = args.jobs == 1 and i % args.speed_every == 0
        return run_one(service, path, max_tokens, args.attempts, steer=not args.no_steer, speed=speed, seed=args.seed)

    try:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(one, i, path): path for i, path in enumerate(paths)}
            for future in concurrent.futures.as_completed(futures):
                path = futures[future]
                rows.append(future.result())
                if args.json:  # as it goes: a long run that is stopped still leaves its rows
                    args.json.write_text(json.dumps(rows, indent=1))
                print(f"[{len(rows)}/{len(paths)}] {path.parent.name}/{path.name}: {rows[-1]['outcome']}",
                      file=sys.stderr)
    finally:
        service.close()

    print_report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


REASON_KINDS = (("the smallest JSON this schema allows", "budget: smallest instance over the token cap"),
                ("leaves no room for an answer", "prompt: no room left in the context"),
                ("repeats a repetition", "regex with nested repetition"),
                ("cannot be used for constrained decoding", "grammar compiler refused"),
                ("intake:", "schema refused at intake"),
                ("truncated at", "truncated"),
                ("is not valid under", "validator rejected the output"))


def reason_kind(reason: str) -> str:
    return next((kind for text, kind in REASON_KINDS if text in reason), "other")


def print_report(rows: list[dict[str, Any]]) -> None:
    by_subset: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in rows:
        by_subset[row["subset"]].append(row)
    table = [summary_row(name, group) for name, group in sorted(by_subset.items())] + [summary_row("all", rows)]
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    for line in table:
        print("| " + " | ".join(line) + " |")
    big = [r["compile_ms"] for r in rows if "compile_ms" in r and r["chars"] >= 20_000]
    if big:
        print(f"\nschemas of 20k+ characters: {len(big)} compiled, compile ms p50 {statistics.median(big):.0f}, "
              f"max {max(big):.0f}")
    kinds = collections.Counter(f"{r['outcome']} ({reason_kind(r['reason'])})" for r in rows
                                if "reason" in r and r["outcome"] != "valid")
    print("\nnot valid, by kind: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()))
    reasons = collections.Counter(f"{r['outcome']}: {r['reason'][:110]}" for r in rows if "reason" in r
                                  and r["outcome"] != "truncated")
    for reason, n in reasons.most_common(25):
        print(f"- {n} × {reason}")


if __name__ == "__main__":
    main()
