"""Speed of the pro tier's llama.cpp path: bare llama-cpp-python vs our backend (vs the running app).

    .venv/bin/python bench/llama_generate.py [--repeats 5] [--threads N] [--max-new 128]
                                             [--model PATH.gguf] [--app-url http://127.0.0.1:7860]

Same GGUF (default: the embedded Gemma 3 270M), same threads, n_ctx, n_batch, greedy decoding.
"bare" is ``Llama.create_completion(stream=True)``; "backend" is ``LlamaCppBackend.decode`` in-process;
"app" (only with --app-url) streams the app's ``generate`` endpoint through gradio_client.
Each engine runs in its own worker process, so RSS is its own and the two never share a mapping;
both stay loaded for the whole run and the requests alternate between them, so a busy neighbour
slows both alike. Prints a markdown table of medians over --repeats runs.

Rows: "single" is one prompt (prompt tok/s = prompt tokens / time to first token; decode tok/s =
tokens after the first / time after the first). "batch ×4" is four prompts: bare runs them one after
another, the backend in one llama.cpp batch; its tok/s is all generated tokens / wall time.
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


# ----------------------------------------------------------------------------- workers


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bare_worker(args: argparse.Namespace):
    import llama_cpp

    llama = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                            n_threads_batch=args.threads, n_batch=args.n_batch, verbose=False)

    def one(prompt: str, max_new: int) -> tuple[int, int, float, float, float]:
        """(prompt tokens, completion tokens, start, first token time, last token time)"""
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
        return n_prompt, n_out, t0, first or t0, last or t0

    def run(prompts: list[str], max_new: int) -> dict:
        t0 = time.perf_counter()
        results = [one(p, max_new) for p in prompts]  # create_completion takes one prompt: in turn
        return summarise(results, t0, time.perf_counter())

    return run


def backend_worker(args: argparse.Namespace):
    from slm_app.backends.base import SamplingParams
    from slm_app.backends.llama_cpp_backend import LlamaCppBackend
    from slm_app.settings import TIER_PROFILES, Settings, Tier

    settings = Settings(model=args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_batch=args.n_batch)
    backend = LlamaCppBackend.load(TIER_PROFILES[Tier.pro], settings, args.model)

    def run(prompts: list[str], max_new: int) -> dict:
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0)
        t0 = time.perf_counter()
        first = last = None
        seqs = []
        for seqs in backend.decode(prompts, params):
            now = time.perf_counter()
            first = first or now
            last = now
        t_end = time.perf_counter()
        return summarise([(s.prompt_tokens, s.completion_tokens, t0, first, last) for s in seqs], t0, t_end)

    return run


def summarise(results: list[tuple[int, int, float, float, float]], t0: float, t_end: float) -> dict:
    if len(results) == 1:
        n_prompt, n_out, start, first, last = results[0]
        return {"ttft_s": first - start, "prompt_tok_s": n_prompt / (first - start),
                "decode_tok_s": (n_out - 1) / (last - first) if last > first else None,
                "tokens": n_out, "rss_mb": rss_mb()}
    n_out = sum(r[1] for r in results)
    return {"ttft_s": results[0][3] - results[0][2], "prompt_tok_s": None,
            "decode_tok_s": n_out / (t_end - t0), "tokens": n_out, "rss_mb": rss_mb()}


def worker_main(args: argparse.Namespace) -> None:
    """Serve requests from stdin, one JSON line each, answering one JSON line each."""
    t0 = time.perf_counter()
    run = bare_worker(args) if args.worker == "bare" else backend_worker(args)
    load_s = time.perf_counter() - t0
    run(["Hello"], 4)  # warm-up: fault in the mapped weights, allocate buffers
    print(json.dumps({"load_s": load_s, "rss_mb": rss_mb()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(run(req["prompts"], req["max_new"])), flush=True)


# ----------------------------------------------------------------------------- the app


def app_run(url: str, prompts: list[str], max_new: int, count_tokens) -> dict | None:
    """Stream the app's ``generate`` endpoint; ``batch`` is not streamed, so only single prompts."""
    if len(prompts) != 1:
        return None
    from gradio_client import Client

    client = app_run.client = getattr(app_run, "client", None) or Client(url, verbose=False)
    t0 = time.perf_counter()
    first = last = None
    text = ""
    job = client.submit(prompt=prompts[0], max_new_tokens=max_new, temperature=0.0, top_p=1.0, seed=-1,
                        top_k=0, stop="", use_chat_template=True, repeat_penalty=1.0, api_name="/generate")
    for update in job:
        now = time.perf_counter()
        if update:
            first = first or now
            last, text = now, update
    n_prompt, n_out = count_tokens(prompts[0]), count_tokens(text, bos=False)
    return {"ttft_s": first - t0, "prompt_tok_s": n_prompt / (first - t0),
            "decode_tok_s": (n_out - 1) / (last - first) if last > first else None,
            "tokens": n_out, "rss_mb": None}


# ----------------------------------------------------------------------------- driver


def start_worker(kind: str, args: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--threads", str(args.threads),
           "--n-ctx", str(args.n_ctx), "--n-batch", str(args.n_batch)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ready = proc.stdout.readline()
    if not ready:
        raise SystemExit(f"{kind} worker failed to start (see its stderr above)")
    return proc, json.loads(ready)


def ask(proc: subprocess.Popen, prompts: list[str], max_new: int) -> dict:
    proc.stdin.write(json.dumps({"prompts": prompts, "max_new": max_new}) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (default: the embedded Gemma 3 270M Q4_K_M)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--app-url", help="a running app (python app.py) to stream /generate from")
    ap.add_argument("--worker", choices=["bare", "backend"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from slm_app.backends.llama_cpp_backend import embedded_gguf
        from slm_app.settings import Settings

        args.model = str(embedded_gguf(Path(Settings().cache_dir)))
    if args.worker:
        return worker_main(args)

    workers = {kind: start_worker(kind, args) for kind in ("bare", "backend")}
    tokenizer = None
    if args.app_url:
        import llama_cpp

        tokenizer = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)

    def count_tokens(text: str, bos: bool = True) -> int:
        return len(tokenizer.tokenize(text.encode(), add_bos=bos, special=True))

    cases = {"single": [PROMPT], "batch ×4": BATCH_PROMPTS}
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for case, prompts in cases.items():
            for kind, (proc, _) in workers.items():
                runs.setdefault((case, kind), []).append(ask(proc, prompts, args.max_new))
            if args.app_url and (res := app_run(args.app_url, prompts, args.max_new, count_tokens)):
                runs.setdefault((case, "app"), []).append(res)
    for proc, _ in workers.values():
        proc.stdin.close()
        proc.wait()

    def median(rs: list[dict], key: str) -> float | None:
        vals = [r[key] for r in rs if r[key] is not None]
        return statistics.median(vals) if vals else None

    prompt_tokens = count_tokens(PROMPT) if tokenizer else None
    print(f"model {Path(args.model).name}, threads {args.threads}, n_ctx {args.n_ctx}, n_batch {args.n_batch}, "
          f"greedy, max_new_tokens {args.max_new}, medians of {args.repeats}"
          + (f", single prompt {prompt_tokens} tokens" if prompt_tokens else ""))
    print()
    print("| request | engine | prompt tok/s | decode tok/s | ratio vs bare | TTFT ms | tokens | RSS MB | load s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for case in cases:
        base = median(runs[(case, "bare")], "decode_tok_s")
        for kind in ("bare", "backend", "app"):
            rs = runs.get((case, kind))
            if not rs:
                continue
            dec = median(rs, "decode_tok_s")
            ready = workers[kind][1] if kind in workers else {}
            print(f"| {case} | {kind} | {fmt(median(rs, 'prompt_tok_s'), '.0f')} | {fmt(dec, '.1f')} | "
                  f"{fmt(dec / base if dec and base else None, '.2f')} | {fmt(median(rs, 'ttft_s') * 1000, '.0f')} | "
                  f"{fmt(median(rs, 'tokens'), '.0f')} | {fmt(median(rs, 'rss_mb'), '.0f')} | "
                  f"{fmt(ready.get('load_s'), '.2f')} |")
    if not args.app_url:
        print("\n(app row skipped: pass --app-url URL of a running app to stream its generate endpoint)")


if __name__ == "__main__":
    main()
