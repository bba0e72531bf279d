"""Benchmark the TensorFlow GPT-2 backend against transformers' own generate, and its slots.

    .venv/bin/python bench/tf_generate.py [--repeats 5] [--tokens 32] [--skip-124m] [--tier-warmup]
                                          [--torch-python /work/torchvenv/bin/python]

Each configuration runs in a fresh subprocess so its RSS is its own. Measured, for tiny-gpt2
(free tier, float16 and float32) and a randomly initialised GPT-2 124M (standard tier, float32):

* single stream, greedy: ours through the ``Scheduler`` (what the app runs: several greedy steps per
  backend call, ``decode_greedy``) and through a bare ``forward`` loop (one call per token), for 124M
  also on XLA's matmul instead of the decode kernel (``SLM_MATVEC_KERNEL=false``; with and without
  ``SLM_BATCH_INVARIANT``), vs transformers' ``generate`` eager and XLA-compiled
  (``tf.function(model.generate, jit_compile=True)``) on the very same Keras model, prompt and
  token count; rounds interleave ours and XLA generate, medians are quoted;
* with ``--torch-python``, also PyTorch transformers' ``GPT2LMHeadModel.generate`` (what many users
  run GPT-2 with): greedy, same prompt token ids and token count, the same GPT-2 config with random
  weights, float32 (also beside our float16 tiny), ``torch.inference_mode()``, as many threads as
  TensorFlow's intra-op pool. It runs in a persistent child process under that other Python (this
  file with ``--torch-worker``), loaded and warmed up once, asked for one generate per round;
* N=3 concurrent requests through the Scheduler vs the same three one after another;
* memory: RSS after load and warm-up for 1 and 8 slots, so the cost of one slot is measured, not
  computed (the KV cache's own size is in ``info().details``); for tiny, throughput by slot count.

The 124M model has random weights (real GPT-2 weights are not available offline): fine for speed
and memory only. Prints a markdown report.

PyTorch is a bench-only baseline and stays out of the project's venv: a full ``torch`` from PyPI
pulls several GB of CUDA libraries. Its own venv, with the CPU wheel this machine holds for Python
3.11 (the project's venv is 3.11 too; uv and poetry don't see that wheel, pip does; an unpinned or
ranged ``torch`` would take a CUDA build)::

    python3.11 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 transformers==4.57.6   # 1.1 GB, torch 2.13.0+cpu
    .venv/bin/python bench/tf_generate.py --skip-memory --repeats 3 --torch-python /work/torchvenv/bin/python
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
TIERS = {"free": dict(max_prompt_tokens=256, max_new_tokens=96), "standard": dict(max_prompt_tokens=512,
                                                                                    max_new_tokens=192)}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- worker: one configuration, in its own process -----------------------------------------

def worker(cfg: dict) -> dict:
    from slm_app.backends.base import Row, SamplingParams
    from slm_app.backends.tf_gpt2 import TFGPT2Backend
    from slm_app.memory import rss_mb
    from slm_app.provisioning.tiny_gpt2 import configure_tensorflow_env
    from slm_app.scheduler import Scheduler
    from slm_app.settings import EngineConfig

    tf = configure_tensorflow_env()
    out: dict = {"rss_import_mb": rss_mb()}
    config = EngineConfig(backend="tensorflow", model=cfg["model"], cache_dir=Path(cfg["cache_dir"]),
                          n_slots=cfg["n_slots"], float16=cfg["float16"], xla=True, warmup=cfg["warmup"],
                          batch_invariant=cfg.get("batch_invariant", True),
                          matvec_kernel=cfg.get("matvec_kernel", True), **TIERS[cfg["tier"]])
    start = time.perf_counter()
    backend = TFGPT2Backend.load(config)
    out["load_s"] = time.perf_counter() - start
    out["rss_load_mb"] = rss_mb()
    if not cfg["warmup"]:
        backend.size_greedy_calls()  # the part of the tier's warmup that decides how greedy calls run
    info = backend.info()
    out.update(dtype=info.details["dtype"], n_params=info.details["n_params"], warmup_s=info.details["warmup_s"],
               kv_mb_per_slot=info.details["kv_cache_mb_per_slot"], per_row=backend._graph.per_row_attention,
               steps_per_call=backend.max_greedy_steps())
    n, repeats = cfg["tokens"], cfg["repeats"]
    greedy = SamplingParams(max_new_tokens=n, temperature=0.0)
    scheduler = Scheduler(backend)

    def through_scheduler(prompt: str) -> tuple[float, float]:
        """(ms/token from first to last token, ms/token from submit to last) for one request."""
        t0 = time.perf_counter()
        marks = []
        for snap in scheduler.submit(backend.tokenize(prompt), greedy).updates(timeout=600):
            marks.append((time.perf_counter(), snap.completion_tokens))
        tokens = marks[-1][1]
        first = next(t for t, k in marks if k >= 1)
        assert tokens == n, f"greedy stopped after {tokens} tokens"
        return 1e3 * (marks[-1][0] - first) / (n - 1), 1e3 * (marks[-1][0] - t0) / n

    def forward_loop(prompt: str) -> float:
        """ms/token of a bare forward loop (prefill + n-1 decode steps), no scheduler."""
        ids = backend.tokenize(prompt)
        t0 = time.perf_counter()
        logits = backend.forward([Row(0, tuple(ids), 0)])
        pos = len(ids)
        for _ in range(n - 1):
            logits = backend.forward([Row(0, (logits.argmax(0),), pos)])
            pos += 1
        logits.argmax(0)
        elapsed = time.perf_counter() - t0
        backend.release(0)
        return 1e3 * elapsed / n

    def concurrent(prompts: list[str]) -> float:
        t0 = time.perf_counter()
        handles = [scheduler.submit(backend.tokenize(p), greedy) for p in prompts]
        tokens = sum(h.result(timeout=600).completion_tokens for h in handles)
        return tokens / (time.perf_counter() - t0)

    def sequential(prompts: list[str]) -> float:
        t0 = time.perf_counter()
        tokens = sum(scheduler.submit(backend.tokenize(p), greedy).result(timeout=600).completion_tokens
                     for p in prompts)
        return tokens / (time.perf_counter() - t0)

    # First calls compile what the tier warm-up did not (when it was skipped).
    start = time.perf_counter()
    through_scheduler(PROMPT)
    forward_loop(PROMPT)
    if cfg["concurrency"]:
        concurrent(BATCH)
    out["first_calls_s"] = time.perf_counter() - start

    # HF's generate runs on the backend's own Keras model, or on the same weights loaded again when the
    # backend did not keep it (with the decode kernels it reads only its own row-major copies).
    model = backend._model
    if model is None:
        from transformers import TFGPT2LMHeadModel

        from slm_app.provisioning.tiny_gpt2 import keras_policy

        with keras_policy("float16" if cfg["float16"] else "float32"):
            model = TFGPT2LMHeadModel.from_pretrained(cfg["model"])
    ids = tf.constant([backend.tokenize(PROMPT)], tf.int32)
    kwargs = dict(attention_mask=tf.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=50256)
    xla_generate = None
    if cfg["hf_xla"]:
        xla_generate = tf.function(model.generate, jit_compile=True)
        t = time.perf_counter()
        xla_generate(ids, **kwargs)
        out["hf_xla_compile_s"] = time.perf_counter() - t

    torch_gen = None
    if cfg.get("torch_python"):
        # TensorFlow's intra-op pool: 0 means its default, one thread per core this process may use.
        threads = tf.config.threading.get_intra_op_parallelism_threads() or len(os.sched_getaffinity(0))
        torch_gen = TorchGenerate(cfg["torch_python"], dict(model=cfg["model"], ids=backend.tokenize(PROMPT),
                                                            tokens=n, threads=threads))
        out["torch"] = torch_gen.info

    sched, sched_e2e, fwd, hf_xla, torch_ms, conc, seq = [], [], [], [], [], [], []
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows every contender alike
        a, b = through_scheduler(PROMPT)
        sched.append(a)
        sched_e2e.append(b)
        fwd.append(forward_loop(PROMPT))
        if xla_generate is not None:
            t = time.perf_counter()
            xla_generate(ids, **kwargs)
            hf_xla.append(1e3 * (time.perf_counter() - t) / n)
        if torch_gen is not None:
            torch_ms.append(torch_gen.round())
        if cfg["concurrency"]:
            conc.append(concurrent(BATCH))
            seq.append(sequential(BATCH))
    out.update(ms_token=median(sched), ms_token_e2e=median(sched_e2e), ms_token_forward=median(fwd))
    if hf_xla:
        out["hf_xla_ms_token"] = median(hf_xla)
    if torch_gen is not None:
        torch_gen.close()
        out["torch_ms_token"] = median(torch_ms)
    if conc:
        out.update(concurrent_tok_s=median(conc), sequential_tok_s=median(seq),
                   concurrency_ratio=median([c / s for c, s in zip(conc, seq)]))
    if cfg["hf_eager"]:
        runs = []
        for _ in range(cfg["hf_repeats"]):
            t = time.perf_counter()
            model.generate(ids, **kwargs)
            runs.append(1e3 * (time.perf_counter() - t) / n)
        out["hf_eager_ms_token"] = median(runs)
    out["rss_end_mb"] = rss_mb()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scheduler.close()
    return out


class TorchGenerate:
    """PyTorch transformers' ``generate`` in a persistent child process run by ``python`` (a venv with
    torch; the project's has none): loads and warms up once, then one timed generate per ``round()``."""

    def __init__(self, python: str, spec: dict) -> None:
        # stderr is inherited: the parent's captured stderr shows the child's traceback on failure.
        self._proc = subprocess.Popen([python, __file__, "--torch-worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.info: dict = self._answer()

    def _answer(self) -> dict | float:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker exited with code {self._proc.wait()} (its stderr is above)")
        return json.loads(line)

    def round(self) -> float:
        """ms/token of one greedy generate, prefill included."""
        self._proc.stdin.write("round\n")
        self._proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self._proc.stdin.close()  # EOF ends the child's loop
        self._proc.wait(timeout=60)


def torch_worker(spec: dict) -> None:
    """The child of ``TorchGenerate``, under the torch venv's Python: nothing of the project is imported."""
    answers, sys.stdout = sys.stdout, sys.stderr  # a stray print from a library cannot garble the protocol
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    # The TF model's own config.json: same sizes, float32 (torch's default), random weights like it.
    model = GPT2LMHeadModel(GPT2Config.from_pretrained(spec["model"])).eval()
    ids = torch.tensor([spec["ids"]], dtype=torch.long)
    n = spec["tokens"]
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=50256)

    def generate_ms() -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            tokens = model.generate(ids, **kwargs).shape[1] - ids.shape[1]
            elapsed = time.perf_counter() - t
        if tokens != n:  # e.g. greedy hit end-of-text: ms/token would not compare
            raise RuntimeError(f"PyTorch generate made {tokens} tokens, not {n}")
        return 1e3 * elapsed / n

    generate_ms()  # warm-up
    answers.write(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                              "threads": torch.get_num_threads(), "attention": model.config._attn_implementation})
                  + "\n")
    answers.flush()
    for request in sys.stdin:
        if request.strip() != "round":
            raise SystemExit(f"unknown request {request!r}")
        answers.write(f"{generate_ms()}\n")
        answers.flush()


def memory_worker(cfg: dict) -> dict:
    """RSS of a loaded, warmed-up backend with ``n_slots`` slots after every slot decoded at once,
    and the aggregate throughput of ``n_slots`` concurrent requests."""
    from slm_app.backends.base import SamplingParams
    from slm_app.backends.tf_gpt2 import TFGPT2Backend
    from slm_app.memory import rss_mb
    from slm_app.scheduler import Scheduler
    from slm_app.settings import EngineConfig

    config = EngineConfig(backend="tensorflow", model=cfg["model"], cache_dir=Path(cfg["cache_dir"]),
                          n_slots=cfg["n_slots"], float16=cfg["float16"], xla=True, warmup=cfg["warmup"],
                          **TIERS[cfg["tier"]])
    backend = TFGPT2Backend.load(config)
    scheduler = Scheduler(backend)
    params = SamplingParams(max_new_tokens=cfg["tokens"], temperature=0.0)
    prompts = [BATCH[i % len(BATCH)] for i in range(cfg["n_slots"])]
    rates = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        handles = [scheduler.submit(backend.tokenize(p), params) for p in prompts]
        tokens = sum(h.result(timeout=600).completion_tokens for h in handles)
        rates.append(tokens / (time.perf_counter() - t0))
    out = {"rss_mb": rss_mb(), "tok_s": median(rates), "warmup_s": backend.info().details["warmup_s"],
           "kv_mb_per_slot": backend.info().details["kv_cache_mb_per_slot"]}
    scheduler.close()
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


def build_model(cache_dir: str, name: str, seed: int, config: dict) -> str:
    code = ("import sys, json; from pathlib import Path; from slm_app.provisioning.tiny_gpt2 import build_random_gpt2; "
            "print(build_random_gpt2(Path(sys.argv[1]), seed=int(sys.argv[2]), **json.loads(sys.argv[3])))")
    target = Path(cache_dir) / name
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(target), str(seed), json.dumps(config)], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    return str(target)


def fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def report(rows: list[dict], mem: list[dict], args: argparse.Namespace, elapsed: float, loads: list[float]) -> str:
    lines = [f"Prompt {len(PROMPT)} chars, {args.tokens} new tokens, greedy; medians of {args.repeats} interleaved "
             f"rounds (HF eager generate: {args.hf_repeats}). Each configuration in a fresh process. Bench wall time "
             f"{elapsed / 60:.1f} min on {os.cpu_count()} cores; 1-minute load average "
             f"{' → '.join(f'{x:.1f}' for x in loads)}. Ratios are HF's ms/token over ours "
             f"(>1: ours is faster); HF generate's time includes its prefill, so ours is compared with "
             f"submit-to-last-token.", ""]
    torch_info = next((r["torch"] for r in rows if "torch" in r), None)
    if torch_info:
        lines[0] += (f" PyTorch generate: torch {torch_info['torch']}, transformers {torch_info['transformers']}, "
                     f"{torch_info['threads']} threads (TensorFlow's intra-op count), {torch_info['attention']} "
                     f"attention, float32 for every row, same GPT-2 config and prompt ids, random weights, "
                     f"one round in each of ours.")
    lines += ["### Single stream, ms/token", "",
              "| model | dtype | greedy steps per call | ours: Scheduler, decode | ours: Scheduler, incl. prefill | ours: bare forward loop | "
              "HF generate XLA | HF generate eager | HF XLA / ours | HF eager / ours | PyTorch generate | PyTorch / ours |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(baseline: float | None, ours: float, digits: int) -> str:
        return f"{fmt(baseline / ours if baseline else None, digits)}×"

    for r in rows:
        xla, eager, torch = r.get("hf_xla_ms_token"), r.get("hf_eager_ms_token"), r.get("torch_ms_token")
        lines.append(f"| {r['model_label']} | {r['dtype']} | {r['steps_per_call']} | {fmt(r['ms_token'], 2)} | {fmt(r['ms_token_e2e'], 2)} | "
                     f"{fmt(r['ms_token_forward'], 2)} | {fmt(xla, 2)} | {fmt(eager, 2)} | "
                     f"{ratio(xla, r['ms_token_e2e'], 2)} | {ratio(eager, r['ms_token_e2e'], 1)} | "
                     f"{fmt(torch, 2)} | {ratio(torch, r['ms_token_e2e'], 2)} |")
    lines += ["", "### 3 concurrent requests through the Scheduler vs the same 3 one after another", "",
              "| model | dtype | slots | concurrent tok/s | sequential tok/s | ratio (median of paired rounds) |",
              "|---|---|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["concurrency"]):
        lines.append(f"| {r['model_label']} | {r['dtype']} | {r['n_slots']} | {fmt(r['concurrent_tok_s'])} | "
                     f"{fmt(r['sequential_tok_s'])} | {fmt(r['concurrency_ratio'], 2)}× |")
    lines += ["", "### Load, compile, memory (RSS MB)", "",
              "| model | dtype | slots | after `import tensorflow` | after load | end | peak | load s | warm-up s | "
              "first calls s | HF XLA compile s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model_label']} | {r['dtype']} | {r['n_slots']} | {fmt(r['rss_import_mb'], 0)} | "
                     f"{fmt(r['rss_load_mb'], 0)} | {fmt(r['rss_end_mb'], 0)} | {fmt(r['peak_rss_mb'], 0)} | "
                     f"{fmt(r['load_s'])} | {fmt(r['warmup_s']) if r['warmup'] else 'lazy'} | "
                     f"{fmt(r['first_calls_s'])} | {fmt(r.get('hf_xla_compile_s'))} |")
    if mem:
        lines += ["", "### Slots: memory and throughput (every slot decoding at once)", "",
                  "tiny: after the full warm-up; 124M: shapes compiled by the run itself unless --tier-warmup.", "",
                  "| model | dtype | slots | RSS MB | MB per extra slot (vs 1 slot) | KV cache MB per slot | "
                  "aggregate tok/s | warm-up s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in mem:
            base = next(m for m in mem if m["model_label"] == r["model_label"] and m["dtype_label"] == r["dtype_label"]
                        and m["n_slots"] == 1)
            per = (r["rss_mb"] - base["rss_mb"]) / (r["n_slots"] - 1) if r["n_slots"] > 1 else None
            lines.append(f"| {r['model_label']} | {r['dtype_label']} | {r['n_slots']} | {fmt(r['rss_mb'], 0)} | "
                         f"{fmt(per)} | {fmt(r['kv_mb_per_slot'], 2)} | {fmt(r['tok_s'])} | {fmt(r['warmup_s'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (median)")
    parser.add_argument("--hf-repeats", type=int, default=2, help="repeats of the slow HF eager baseline")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--skip-124m", action="store_true", help="only the tiny model (fast)")
    parser.add_argument("--skip-tiny", action="store_true", help="only the 124M model")
    parser.add_argument("--skip-memory", action="store_true", help="no slot sweep")
    parser.add_argument("--tier-warmup", action="store_true",
                        help="compile every shape of the tier at load, as the app does (124M: minutes)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "slm_app"))
    parser.add_argument("--torch-python", metavar="PATH",
                        help="a Python with torch and transformers (see the recipe above): adds PyTorch generate")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker(json.loads(args.torch_worker))
        return
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return

    start = time.perf_counter()
    from slm_app.provisioning.tiny_gpt2 import TINY_GPT2_CONFIG

    tiny_path = build_model(args.cache_dir, "tiny-gpt2-offline", 0, TINY_GPT2_CONFIG)
    common = dict(cache_dir=args.cache_dir, tokens=args.tokens, repeats=args.repeats, hf_repeats=args.hf_repeats,
                  warmup=args.tier_warmup, concurrency=True, hf_xla=True)
    tiny = dict(common, tier="free", model=tiny_path, model_label="tiny-gpt2 (random)", n_slots=4)
    configs = [] if args.skip_tiny else [dict(tiny, label="tiny fp16", float16=True, hf_eager=True),
                                         dict(tiny, label="tiny fp32", float16=False, hf_eager=True)]
    big_path = None
    if not args.skip_124m:
        print("building the random 124M GPT-2 (once)...", file=sys.stderr, flush=True)
        big_path = build_model(args.cache_dir, "bench-gpt2-124m-random", 0, GPT2_124M)
        big = dict(common, tier="standard", model=big_path, model_label="GPT-2 124M (random)", n_slots=3)
        configs += [dict(big, label="124M fp32", float16=False, hf_eager=True),
                    # XLA's matmul instead of the decode kernel: a lone row beside its dummy twin.
                    dict(big, label="124M fp32 XLA matmul", model_label="GPT-2 124M (random), `SLM_MATVEC_KERNEL=false`",
                         float16=False, hf_eager=False, matvec_kernel=False),
                    # ...and without batch invariance: XLA's 1-row kernel for a lone row.
                    dict(big, label="124M fp32 XLA lone row", float16=False, hf_eager=False, concurrency=False,
                         model_label="GPT-2 124M (random), `SLM_MATVEC_KERNEL=false SLM_BATCH_INVARIANT=false`",
                         matvec_kernel=False, batch_invariant=False)]
    loads = [os.getloadavg()[0]]
    rows = []
    for cfg in configs:
        rows.append(run_worker(dict(cfg, torch_python=args.torch_python)))
        loads.append(os.getloadavg()[0])
    mem = []
    if not args.skip_memory:
        # 124M: shapes compiled lazily by the run itself (the full tier warm-up takes minutes per process).
        sweeps = [] if args.skip_tiny else [(tiny_path, "tiny-gpt2 (random)", "free", True, "float16", (1, 2, 4, 8),
                                             True)]
        if big_path:
            sweeps += [(big_path, "GPT-2 124M (random)", "standard", False, "float32", (1, 3), args.tier_warmup),
                       (big_path, "GPT-2 124M (random)", "standard", True, "float16", (1, 3), args.tier_warmup)]
        for path, label, tier, f16, dtype, slot_counts, warm in sweeps:
            for n_slots in slot_counts:
                cfg = dict(cache_dir=args.cache_dir, model=path, model_label=label, tier=tier, float16=f16,
                           dtype_label=dtype, n_slots=n_slots, tokens=args.tokens, repeats=3, warmup=warm,
                           label=f"memory {label} {dtype} {n_slots} slots")
                env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(cfg)], env=env,
                                      capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    sys.exit(f"{cfg['label']} failed:\n{proc.stderr[-3000:]}")
                mem.append({**cfg, **json.loads(proc.stdout.strip().splitlines()[-1])})
                print(f"  {cfg['label']}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        loads.append(os.getloadavg()[0])
    print(report(rows, mem, args, time.perf_counter() - start, loads))


if __name__ == "__main__":
    main()
