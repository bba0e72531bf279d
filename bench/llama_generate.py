"""Speed of the pro tier's llama.cpp path: bare llama-cpp-python vs our backend under the Scheduler.

    .venv/bin/python bench/llama_generate.py [--repeats 5] [--threads N] [--max-new 128]
                                             [--model PATH.gguf | embedded:NAME] [--identity 16]

Same GGUF (default: the embedded Gemma 3 270M), same threads, n_ctx, n_batch, greedy decoding.
"bare" is ``Llama.create_completion(stream=True)``, one prompt at a time (it takes one);
"scheduler" is ``LlamaCppBackend`` driven by ``slm_app.scheduler.Scheduler`` with 4 slots, as the
app runs it. Each engine runs in its own worker process (RSS is its own; the two never share a
mapping); both stay loaded for the whole run and the cases alternate between them, so a busy
neighbour slows both alike. Prints a markdown table of medians over --repeats interleaved runs.

Cases: "single" is one prompt (prompt tok/s = prompt tokens / time to first token; decode tok/s =
tokens after the first / time after the first). "4 in turn" runs four prompts one after another,
"4 concurrent" submits all four at once (the scheduler decodes them in one llama.cpp batch per
step); their tok/s is all generated tokens / wall time.

``--identity N`` also runs N prompts greedily alone and then in groups of four concurrent requests
and reports the share whose tokens are identical: a multi-row batch runs other matmul kernels and
summation orders than a one-row batch, so near-ties may flip.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = (
    "The history of computing is longer than the history of computing hardware and modern computing "
    "technology. It includes the history of methods intended for pen and paper or for chalk and slate, "
    "with or without the aid of tables. Digital computing is intimately tied to the representation of "
    "numbers. But long before abstractions like the number arose, there were mathematical concepts to "
    "serve the purposes of civilization. These concepts are implicit in concrete practices such as "
    "one-to-one correspondence, the basis of counting, comparison to a standard, used for measurement, "
    "and the 3-4-5 right triangle, a device for assuring a right angle. The earliest known tool for use "
    "in computation is the Sumerian abacus, and it was thought to have been invented in Babylon around "
    "2700 to 2300 BC. Its original style of usage was by lines drawn in sand with pebbles. In the "
    "seventeenth century, the slide rule and the mechanical calculator followed, and in the nineteenth "
    "century Charles Babbage designed the first programmable machine, which he called the"
)
BATCH_PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The three most important ideas in thermodynamics are",
    "def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n",
    "A recipe for bread: first, mix the flour and",
]
IDENTITY_PROMPTS = [
    "The capital of France is", "Water boils at", "My favourite animal is the", "1, 2, 3, 4,",
    "The best way to learn a language is", "In 1969, astronauts", "A good breakfast includes",
    "The three primary colours are", "import numpy as np\n", "Dear Sir or Madam,", "The sun rises in the",
    "Photosynthesis is the process", "To make tea, first", "The largest ocean on Earth is",
    "Once upon a time", "The quick brown fox", "Mount Everest is", "Shakespeare wrote",
    "The speed of light is", "A haiku about autumn:", "The Roman Empire fell", "Rain is caused by",
    "My grandmother used to say", "The first computer was",
]


# ----------------------------------------------------------------------------- workers


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bare_worker(args: argparse.Namespace):
    import llama_cpp

    llama = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                            n_threads_batch=args.threads, n_batch=args.n_batch, verbose=False)

    def one(prompt: str, max_new: int) -> dict:
        n_prompt = len(llama.tokenize(prompt.encode(), add_bos=True, special=True))
        t0 = time.perf_counter()
        first = last = None
        chunks, finish = 0, None
        for chunk in llama.create_completion(prompt, max_tokens=max_new, temperature=0.0, top_k=0, top_p=1.0,
                                             min_p=0.0, stream=True):
            now = time.perf_counter()
            choice = chunk["choices"][0]
            if choice["text"]:
                chunks += 1
                first = first or now
                last = now
            finish = choice["finish_reason"] or finish
        # Without stop strings every token is one chunk, except bytes of a split UTF-8 character;
        # a run that hit max_tokens made exactly max_new tokens.
        n_out = max_new if finish == "length" else chunks
        return {"prompt": n_prompt, "out": n_out, "ttft": (first or t0) - t0, "end": (last or t0) - t0}

    def run(prompts: list[str], max_new: int, concurrent: bool) -> dict:
        assert not concurrent, "create_completion takes one prompt"
        t0 = time.perf_counter()
        results = [one(p, max_new) for p in prompts]
        return summarise(results, time.perf_counter() - t0)

    return run, None


def scheduler_worker(args: argparse.Namespace):
    from slm_app.backends.base import SamplingParams
    from slm_app.backends.llama_cpp_backend import LlamaCppBackend
    from slm_app.scheduler import Scheduler
    from slm_app.settings import EngineConfig

    config = EngineConfig(backend="llama.cpp", model=args.model, cache_dir=Path(args.cache_dir), n_slots=4,
                          max_prompt_tokens=args.n_ctx, max_new_tokens=args.max_new, n_ctx=args.n_ctx,
                          n_threads=args.threads, n_batch=args.n_batch, warmup=False)
    backend = LlamaCppBackend.load(config)
    scheduler = Scheduler(backend)

    def submit(prompt: str, max_new: int):
        # Raw completion, as the bare engine does (no chat template), BOS as the model wants it.
        return scheduler.submit(backend.tokenize(prompt), SamplingParams(max_new_tokens=max_new, temperature=0.0))

    def as_result(final) -> dict:
        return {"prompt": final.prompt_tokens, "out": final.completion_tokens, "ttft": final.ttft_s,
                "end": final.elapsed_s, "ids": None}

    def run(prompts: list[str], max_new: int, concurrent: bool) -> dict:
        t0 = time.perf_counter()
        if concurrent:
            finals = [g.result(600) for g in [submit(p, max_new) for p in prompts]]
        else:
            finals = [submit(p, max_new).result(600) for p in prompts]
        return summarise([as_result(f) for f in finals], time.perf_counter() - t0)

    def identity(prompts: list[str], max_new: int) -> dict:
        """Greedy texts alone, then in groups of four concurrent requests."""
        alone = [submit(p, max_new).result(600).text for p in prompts]
        together = []
        for i in range(0, len(prompts), 4):
            together += [g.result(600).text for g in [submit(p, max_new) for p in prompts[i:i + 4]]]
        return {"alone": alone, "together": together}

    return run, identity


def summarise(results: list[dict], wall: float) -> dict:
    if len(results) == 1:
        r = results[0]
        return {"ttft_s": r["ttft"], "prompt_tok_s": r["prompt"] / r["ttft"],
                "decode_tok_s": (r["out"] - 1) / (r["end"] - r["ttft"]) if r["end"] > r["ttft"] else None,
                "tokens": r["out"], "rss_mb": rss_mb()}
    n_out = sum(r["out"] for r in results)
    return {"ttft_s": statistics.median(r["ttft"] for r in results), "prompt_tok_s": None,
            "decode_tok_s": n_out / wall, "tokens": n_out, "rss_mb": rss_mb()}


def worker_main(args: argparse.Namespace) -> None:
    """Serve requests from stdin, one JSON line each, answering one JSON line each."""
    t0 = time.perf_counter()
    run, identity = bare_worker(args) if args.worker == "bare" else scheduler_worker(args)
    load_s = time.perf_counter() - t0
    run(["Hello"], 4, False)  # warm-up: fault in the mapped weights, allocate buffers
    print(json.dumps({"load_s": load_s, "rss_mb": rss_mb()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("identity"):
            print(json.dumps(identity(req["prompts"], req["max_new"])), flush=True)
        else:
            print(json.dumps(run(req["prompts"], req["max_new"], req["concurrent"])), flush=True)


# ----------------------------------------------------------------------------- driver


def start_worker(kind: str, args: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--threads", str(args.threads),
           "--n-ctx", str(args.n_ctx), "--n-batch", str(args.n_batch), "--max-new", str(args.max_new),
           "--cache-dir", args.cache_dir]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ready = proc.stdout.readline()
    if not ready:
        raise SystemExit(f"{kind} worker failed to start (see its stderr above)")
    return proc, json.loads(ready)


def ask(proc: subprocess.Popen, **request) -> dict:
    proc.stdin.write(json.dumps(request) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded:gemma-3-270m", help="GGUF file or embedded:NAME")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--identity", type=int, default=0, metavar="N",
                    help=f"greedy identical-output share over N prompts (at most {len(IDENTITY_PROMPTS)})")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--worker", choices=["bare", "scheduler"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    from slm_app.settings import Settings

    args.cache_dir = args.cache_dir or str(Path(Settings().cache_dir).expanduser())
    if args.model.startswith("embedded:"):  # the bare engine needs the file
        from slm_app.provisioning.embedded import embedded_model

        args.model = str(embedded_model(args.model).locate(Path(args.cache_dir)))
    if args.worker:
        return worker_main(args)

    workers = {kind: start_worker(kind, args) for kind in ("bare", "scheduler")}
    bare, sched = workers["bare"][0], workers["scheduler"][0]
    # (case, engine) -> how to ask it
    plan = [
        ("single", "bare", dict(prompts=[PROMPT], concurrent=False), bare),
        ("single", "scheduler", dict(prompts=[PROMPT], concurrent=False), sched),
        ("4 in turn", "bare", dict(prompts=BATCH_PROMPTS, concurrent=False), bare),
        ("4 in turn", "scheduler", dict(prompts=BATCH_PROMPTS, concurrent=False), sched),
        ("4 concurrent", "scheduler", dict(prompts=BATCH_PROMPTS, concurrent=True), sched),
    ]
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for case, kind, request, proc in plan:
            runs.setdefault((case, kind), []).append(ask(proc, max_new=args.max_new, **request))
    identity = None
    if args.identity:
        identity = ask(sched, identity=True, prompts=IDENTITY_PROMPTS[:args.identity], max_new=args.max_new)
    for proc, _ in workers.values():
        proc.stdin.close()
        proc.wait()

    def median(rs: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rs if r[key] is not None]
        return statistics.median(vals) if vals else None

    print(f"model {Path(args.model).name}, threads {args.threads}, n_ctx {args.n_ctx}, n_batch {args.n_batch}, "
          f"greedy, max_new_tokens {args.max_new}, medians of {args.repeats} interleaved repeats")
    print()
    print("| case | engine | prompt tok/s | decode tok/s | vs bare | TTFT ms | tokens | RSS MB | load s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in dict.fromkeys(c for c, *_ in plan):
        base = median(runs.get((case, "bare"), []) or runs[("4 in turn", "bare")], "decode_tok_s")
        for kind in ("bare", "scheduler"):
            rs = runs.get((case, kind))
            if not rs:
                continue
            dec = median(rs, "decode_tok_s")
            ready = workers[kind][1]
            print(f"| {case} | {kind} | {fmt(median(rs, 'prompt_tok_s'), '.0f')} | {fmt(dec, '.1f')} | "
                  f"{fmt(dec / base if dec and base else None, '.2f')} | {fmt(median(rs, 'ttft_s') * 1000, '.0f')} | "
                  f"{fmt(median(rs, 'tokens'), '.0f')} | {fmt(median(rs, 'rss_mb'), '.0f')} | "
                  f"{fmt(ready.get('load_s'), '.2f')} |")
    print("\n(\"4 concurrent\" is compared with bare running the four prompts in turn)")
    if identity:
        pairs = list(zip(identity["alone"], identity["together"]))
        same = sum(a == b for a, b in pairs)
        prefix = [len(os.path.commonprefix([a, b])) / max(len(a), 1) for a, b in pairs]
        print(f"\ngreedy, {len(pairs)} prompts alone vs in groups of 4 concurrent: {same}/{len(pairs)} identical "
              f"({100 * same / len(pairs):.0f}%); where they differ, the common start is "
              f"{100 * statistics.median([p for (a, b), p in zip(pairs, prefix) if a != b] or [1.0]):.0f}% "
              f"of the alone text (median)")


if __name__ == "__main__":
    main()
