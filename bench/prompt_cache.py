"""The prompt cache against llama-server, side by side on the same GGUF, threads and requests.

    .venv/bin/python bench/prompt_cache.py --llama-server PATH/llama-server [--threads 2] [--repeats 3]
        [--app-env SLM_N_BATCH=512 ...]
    .venv/bin/python bench/prompt_cache.py --cache-off-baseline   # the app against itself, cache off

Starts llama-server (``-np 4 -c 8192 -t THREADS``, its defaults otherwise: ``-b 2048 -ub 512``,
``cache_prompt`` on) and the app (``app.py``, pro tier, the embedded SmolLM2-135M-Instruct GGUF,
``SLM_PARALLEL=4 SLM_N_CTX=8192 SLM_N_THREADS=THREADS``), then measures each side alone (never both
at once: the machine has two cores) with streaming ``/v1/chat/completions``, greedy:

* multi-turn: a ~1.2k-token system document and six short user turns, each request resending the
  whole conversation (as chat clients do). TTFT per turn (request sent to first content).
* shared prefix: four users, the same ~1.2k-token system prompt, different questions, sent at once.
  Summed TTFT of the four.

Each repeat starts its document with a new line so that no side reuses an earlier repeat's cache.
Medians over --repeats. Goals (issue 26): turns 2+ ≤ 1.2× llama-server, turn 1 ≤ 1.1×, shared
prefix summed TTFT ≤ 0.7×.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.remote_overhead import free_port, wait_ready  # noqa: E402

TURNS = ["What does the red lamp mean?", "And the blue one?", "Which rule comes after rule 12?",
         "Summarise rule 30 in five words.", "Is there a rule about green lamps?", "Thank you. One last thing: rule 41?"]
QUESTIONS = ["What does rule 7 say?", "Which lamp is amber in rule 3?", "How many rules are there?",
             "Name a rule about the blue lamp."]


def document(tag: str) -> str:
    """~1.2k SmolLM2 tokens of rules, opened by ``tag`` (a new prefix per repeat)."""
    colours = ["red", "blue", "green", "amber"]
    rules = " ".join(f"Rule {i}: when the {colours[i % 4]} lamp blinks {i % 3 + 1} times, go to station {i * 7 % 50}."
                     for i in range(52))
    return f"Session {tag}. You answer questions about this rule book.\n{rules}"


async def stream_chat(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int
                      ) -> tuple[float, str, dict]:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, text, usage = None, "", {}
    async with client.stream("POST", f"{url}/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    text += piece
                    if first is None:
                        first = time.perf_counter()
    return (first or time.perf_counter()) - start, text, usage


async def multi_turn(client: httpx.AsyncClient, url: str, model: str, tag: str, max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": document(tag)}]
    out = []
    for question in TURNS:
        messages.append({"role": "user", "content": question})
        ttft, text, usage = await stream_chat(client, url, model, messages, max_tokens)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        out.append({"ttft": ttft, "prompt": usage.get("prompt_tokens"), "cached": cached})
        messages.append({"role": "assistant", "content": text})
    return out


async def shared_prefix(client: httpx.AsyncClient, url: str, model: str, tag: str, max_tokens: int) -> float:
    system = {"role": "system", "content": document(tag)}
    results = await asyncio.gather(*(stream_chat(client, url, model, [system, {"role": "user", "content": q}],
                                                 max_tokens) for q in QUESTIONS))
    return sum(ttft for ttft, _, _ in results)


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)


async def run(args: argparse.Namespace) -> None:
    from slm_app.provisioning.embedded import smollm2_gguf

    gguf = args.model or str(smollm2_gguf())
    logs = Path(tempfile.mkdtemp(prefix="prompt_cache_bench_"))
    peer_port, app_port = free_port(), free_port()
    env = {**os.environ, "SLM_TIER": "pro", "GRADIO_SERVER_PORT": str(app_port), "SLM_PARALLEL": "4",
           "SLM_N_CTX": "8192", "SLM_N_THREADS": str(args.threads), "SLM_MAX_PROMPT_TOKENS": "4096",
           **dict(kv.split("=", 1) for kv in args.app_env)}
    if args.llama_server:
        peer_name = "llama-server"
        peer = start([args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port", str(peer_port),
                      "-t", str(args.threads), "-np", "4", "-c", "8192", "--no-webui"],
                     dict(os.environ), logs / "llama-server.log")
        peer_ready = f"http://127.0.0.1:{peer_port}/v1/models"
    else:
        peer_name = "app, cache off"
        peer = start([sys.executable, str(ROOT / "app.py")],
                     {**env, "GRADIO_SERVER_PORT": str(peer_port), "SLM_PROMPT_CACHE": "false"}, logs / "app-off.log")
        peer_ready = f"http://127.0.0.1:{peer_port}/health"
    app = start([sys.executable, str(ROOT / "app.py")], env, logs / "app.log")
    sides = {"app": f"http://127.0.0.1:{app_port}/v1", peer_name: f"http://127.0.0.1:{peer_port}/v1"}
    turns: dict[str, list[list[float]]] = {s: [[] for _ in TURNS] for s in sides}
    cached: dict[str, list] = {s: [None] * len(TURNS) for s in sides}
    shared: dict[str, list[float]] = {s: [] for s in sides}
    try:
        wait_ready(peer_ready, peer, peer_name)
        wait_ready(f"http://127.0.0.1:{app_port}/health", app, "app")
        # A new connection per request: llama-server closes idle keep-alive connections after a few
        # seconds, and a request sent on one it has just closed fails ("Server disconnected"); a
        # connect on localhost costs well under a millisecond, for both sides alike.
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            models = {s: (await client.get(f"{u}/models")).json()["data"][0]["id"] for s, u in sides.items()}
            for side, url in sides.items():  # warm-up: connections, templates, first allocations
                await stream_chat(client, url, models[side], [{"role": "user", "content": "Hi"}], 4)
            for rep in range(args.repeats):
                order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
                for side in order:
                    for i, t in enumerate(await multi_turn(client, sides[side], models[side], f"{rep}-mt-{side}",
                                                           args.max_tokens)):
                        turns[side][i].append(t["ttft"])
                        cached[side][i] = t["cached"]
                    shared[side].append(await shared_prefix(client, sides[side], models[side], f"{rep}-sp-{side}",
                                                            args.max_tokens))
                print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)
                report(args, peer_name, turns, cached, shared, rep + 1, logs)
    finally:
        for proc in (app, peer):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()

def report(args: argparse.Namespace, peer_name: str, turns: dict, cached: dict, shared: dict, done: int,
           logs: Path) -> None:
    med = {s: [statistics.median(v) for v in turns[s]] for s in turns}
    peer_med = med[peer_name]
    print(f"\nSmolLM2-135M-Instruct Q4_1, {args.threads} threads, greedy, max_tokens {args.max_tokens}, "
          f"median of {done} repeat(s) (logs: {logs})\n")
    print("Multi-turn (~1.2k-token system document, each request resends the conversation): TTFT per turn\n")
    print(f"| turn | app | {peer_name} | ratio | app cached tokens |")
    print("|---:|---:|---:|---:|---:|")
    for i in range(len(TURNS)):
        a, p = med["app"][i], peer_med[i]
        print(f"| {i + 1} | {a:.3f} s | {p:.3f} s | {a / p:.2f}× | {cached['app'][i]} |")
    a, p = statistics.median(shared["app"]), statistics.median(shared[peer_name])
    print("\nShared prefix (4 users at once, the same ~1.2k-token system prompt, different questions): summed TTFT\n")
    print(f"| | app | {peer_name} (4 slots) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| summed TTFT | {a:.3f} s | {p:.3f} s | {a / p:.2f}× |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--llama-server", help="path of llama.cpp's llama-server binary")
    group.add_argument("--cache-off-baseline", action="store_true", help="compare with the app, SLM_PROMPT_CACHE=false")
    parser.add_argument("--model", help="GGUF (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--app-env", action="append", default=[], help="extra KEY=VALUE for the app (a sweep)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
