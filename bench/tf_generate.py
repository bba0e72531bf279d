"""Benchmark the TensorFlow GPT-2 backend: XLA vs no XLA, batching, memory, float16.

    .venv/bin/python bench/tf_generate.py [--repeats 5] [--tokens 32] [--skip-124m] [--tier-warmup]

Each configuration runs in a fresh subprocess so its RSS is its own. Baselines come from
the same run: transformers' own ``generate`` (eager, and XLA-compiled the way MODELS.md
measured it) on the same model, prompt and token count. The 124M model has random
weights (real GPT-2 weights are not available offline): fine for speed and memory only.
Prints a markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The quick brown fox jumps over the lazy dog."
BATCH = ["Once upon a time", "The weather today is", "In a shocking finding, scientists discovered a herd of unicorns"]
GPT2_124M = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- worker: one configuration, in its own process -----------------------------------------

def timed_decode(backend, prompts: list[str], params) -> tuple[list[float], float]:
    """Seconds from the call to each yielded step, and the time until the generator was done."""
    start = time.perf_counter()
    marks = [time.perf_counter() - start for _ in backend.decode(prompts, params)]
    return marks, time.perf_counter() - start


def worker(cfg: dict) -> dict:
    from slm_app.memory import rss_mb
    from slm_app.backends.tf_gpt2 import TFGPT2Backend, configure_tensorflow_env
    from slm_app.backends.base import SamplingParams
    from slm_app.settings import TIER_PROFILES, Settings, Tier

    tf = configure_tensorflow_env()
    out: dict = {"rss_import_mb": rss_mb()}
    profile = TIER_PROFILES[Tier(cfg["tier"])].model_copy(update={"float16": cfg["float16"]})
    settings = Settings(cache_dir=cfg["cache_dir"], warmup=cfg["tier_warmup"], xla=cfg["xla"])
    start = time.perf_counter()
    backend = TFGPT2Backend.load(profile, settings, cfg["model"])
    out["load_s"] = time.perf_counter() - start
    out["rss_load_mb"] = rss_mb()
    info = backend.info()
    out.update(dtype=info["dtype"], n_params=info["n_params"], xla=info["xla"], warmup_s=info["warmup_s"])
    n, repeats = cfg["tokens"], cfg["repeats"]
    params = SamplingParams(max_new_tokens=n, temperature=0.0)

    # First call compiles the shapes this request needs (when the tier warm-up did not).
    marks, _ = timed_decode(backend, [PROMPT], params)
    out["first_call_s"] = marks[-1]
    steady, e2e, ttft, tail = [], [], [], []
    for _ in range(repeats):
        marks, total = timed_decode(backend, [PROMPT], params)
        assert len(marks) == n, "greedy on a random model should not stop early"
        steady.append((marks[-1] - marks[0]) / (n - 1))
        e2e.append(marks[-1] / n)
        ttft.append(marks[0])
        tail.append(total - marks[-1])  # garbage collection after the last token (aggressive_gc tiers)
    out.update(ms_token=1e3 * median(steady), ms_token_best=1e3 * min(steady), ms_token_e2e=1e3 * median(e2e),
               ttft_ms=1e3 * median(ttft), after_last_ms=1e3 * median(tail))

    if cfg["batch"]:
        timed_decode(backend, BATCH, params)  # compile the batch bucket
        batch_s, seq_s = [], []
        for _ in range(repeats):
            batch_s.append(timed_decode(backend, BATCH, params)[0][-1])
            seq_s.append(sum(timed_decode(backend, [p], params)[0][-1] for p in BATCH))
        out.update(batch3_tok_s=3 * n / median(batch_s), seq3_tok_s=3 * n / median(seq_s))
    out["rss_end_mb"] = rss_mb()

    # Baselines: transformers' own generate on the very same Keras model.
    model, tokenizer = backend._model, backend._tokenizer
    ids = tf.constant([tokenizer.encode(PROMPT)], tf.int32)
    kwargs = dict(attention_mask=tf.ones_like(ids), max_new_tokens=n, do_sample=False,
                  pad_token_id=tokenizer.eos_token_id)
    if cfg["hf_eager"]:
        runs = []
        for _ in range(cfg["hf_repeats"]):
            t = time.perf_counter()
            model.generate(ids, **kwargs)
            runs.append((time.perf_counter() - t) / n)
        out["hf_eager_ms_token"] = 1e3 * median(runs)
    if cfg["hf_xla"]:
        xla_generate = tf.function(model.generate, jit_compile=True)
        t = time.perf_counter()
        xla_generate(ids, **kwargs)
        out["hf_xla_compile_s"] = time.perf_counter() - t
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            xla_generate(ids, **kwargs)
            runs.append((time.perf_counter() - t) / n)
        out["hf_xla_ms_token"] = 1e3 * median(runs)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    backend.close()
    return out


# ---- driver ------------------------------------------------------------------------------

def run_worker(cfg: dict) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"worker {cfg['label']} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {cfg['label']}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return {**cfg, **result}


def build_124m(cache_dir: str) -> str:
    code = ("import sys; from pathlib import Path; from slm_app.backends.tf_gpt2 import build_random_gpt2; "
            f"print(build_random_gpt2(Path(sys.argv[1]), seed=0, **{GPT2_124M!r}))")
    target = Path(cache_dir) / "bench-gpt2-124m-random"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(target)], env=env, check=True, capture_output=True, cwd=ROOT)
    return str(target)


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def report(rows: list[dict], args: argparse.Namespace, elapsed: float, loads: list[float]) -> str:
    lines = [f"Prompt {len(PROMPT)} chars, {args.tokens} new tokens, greedy; medians of {args.repeats} repeats "
             f"(HF eager generate: {args.hf_repeats}). Each configuration in a fresh process. "
             f"Bench wall time {elapsed / 60:.1f} min on {os.cpu_count()} cores; 1-minute load average "
             f"{' → '.join(f'{x:.1f}' for x in loads)} (start → end of each configuration). Speed-ups are "
             f"the baseline's ms/token over ours including prefill (HF generate includes it too); >1× is faster.",
             ""]
    lines += ["### Latency per token", "",
              "| tier / model | dtype | decode loop | ms/token steady (best) | ms/token incl. prefill | TTFT ms | "
              "first call s (compile) | speed-up vs HF eager | speed-up vs HF XLA |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in dict.fromkeys(r["model_label"] for r in rows):
        group = [r for r in rows if r["model_label"] == model]
        eager = next((r["hf_eager_ms_token"] for r in group if "hf_eager_ms_token" in r), None)
        hf_xla = next((r for r in group if "hf_xla_ms_token" in r), None)
        for r in group:
            loop = "XLA" if r["xla"] else "TF graph, no XLA"
            lines.append(f"| {model} | {r['dtype']} | ours, {loop} | "
                         f"{fmt(r['ms_token'], 2)} ({fmt(r['ms_token_best'], 2)}) | "
                         f"{fmt(r['ms_token_e2e'], 2)} | {fmt(r['ttft_ms'])} | {fmt(r['first_call_s'])} | "
                         f"{fmt(eager / r['ms_token_e2e'] if eager else None)}× | "
                         f"{fmt(hf_xla['hf_xla_ms_token'] / r['ms_token_e2e'] if hf_xla else None, 2)}× |")
        if eager:
            lines.append(f"| {model} | {group[0]['dtype']} | HF `generate`, eager (baseline) | – | {fmt(eager, 2)} | "
                         f"– | – | 1.0× | |")
        if hf_xla:
            lines.append(f"| {model} | {hf_xla['dtype']} | HF `generate`, `tf.function(jit_compile=True)` | – | "
                         f"{fmt(hf_xla['hf_xla_ms_token'], 2)} | – | {fmt(hf_xla['hf_xla_compile_s'])} | "
                         f"{fmt(eager / hf_xla['hf_xla_ms_token'] if eager else None)}× | 1.0× |")
    lines += ["", "### Batch of 3 prompts (one padded batch) vs the same 3 one after another", "",
              "| tier / model | dtype | decode loop | batch of 3 tok/s | 3 sequential tok/s | speed-up |",
              "|---|---|---|---:|---:|---:|"]
    for r in (r for r in rows if r["batch"]):
        lines.append(f"| {r['model_label']} | {r['dtype']} | {'XLA' if r['xla'] else 'no XLA'} | "
                     f"{fmt(r['batch3_tok_s'])} | {fmt(r['seq3_tok_s'])} | "
                     f"{fmt(r['batch3_tok_s'] / r['seq3_tok_s'], 2)}× |")
    lines += ["", "### Memory (RSS, MB)", "",
              "| tier / model | dtype | decode loop | after `import tensorflow` | after load | after the runs | peak | "
              "load s | tier warm-up s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model_label']} | {r['dtype']} | {'XLA' if r['xla'] else 'no XLA'} | "
                     f"{fmt(r['rss_import_mb'], 0)} | {fmt(r['rss_load_mb'], 0)} | {fmt(r['rss_end_mb'], 0)} | "
                     f"{fmt(r['peak_rss_mb'], 0)} | {fmt(r['load_s'])} | "
                     f"{fmt(r['warmup_s']) if r['tier_warmup'] else 'not run'} |")
    after_gc = [r for r in rows if r["after_last_ms"] > 5]
    if after_gc:
        lines += ["", "Aggressive GC (free tier): the decode generator's final `gc.collect()` takes "
                  + ", ".join(f"{fmt(r['after_last_ms'], 0)} ms ({r['model_label']}, "
                              f"{'XLA' if r['xla'] else 'no XLA'})" for r in after_gc)
                  + " after the last token of each request."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--hf-repeats", type=int, default=3, help="repeats of the slow HF eager baseline")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--skip-124m", action="store_true", help="only the tiny model (fast)")
    parser.add_argument("--tier-warmup", action="store_true",
                        help="compile every bucket of the tier at load, as the app does (124M: minutes)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "slm_app"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    start = time.perf_counter()
    common = dict(cache_dir=args.cache_dir, tokens=args.tokens, repeats=args.repeats, hf_repeats=args.hf_repeats,
                  tier_warmup=args.tier_warmup)
    tiny = dict(common, tier="free", model="sshleifer/tiny-gpt2", model_label="free: tiny-gpt2 (random)")
    configs = [dict(tiny, label="tiny fp16 XLA", float16=True, xla=True, batch=True, hf_eager=False, hf_xla=True),
               dict(tiny, label="tiny fp16 no-XLA", float16=True, xla=False, batch=True, hf_eager=True, hf_xla=False)]
    if not args.skip_124m:
        print("building the random 124M GPT-2 (once)...", file=sys.stderr, flush=True)
        big = dict(common, tier="standard", model=build_124m(args.cache_dir),
                   model_label="standard: GPT-2 124M (random weights)")
        # float16 is here for memory; this CPU has no fp16 arithmetic, so its batch runs would only cost minutes.
        configs += [dict(big, label="124M fp32 XLA", float16=False, xla=True, batch=True, hf_eager=False, hf_xla=True),
                    dict(big, label="124M fp32 no-XLA", float16=False, xla=False, batch=True, hf_eager=True,
                         hf_xla=False),
                    dict(big, label="124M fp16 XLA", float16=True, xla=True, batch=False, hf_eager=False, hf_xla=False)]
    loads = [os.getloadavg()[0]]
    rows = []
    for cfg in configs:
        rows.append(run_worker(cfg))
        loads.append(os.getloadavg()[0])
    print(report(rows, args, time.perf_counter() - start, loads))


if __name__ == "__main__":
    main()
