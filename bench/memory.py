"""Whole-process memory per tier and backend, and LiteRT's decode speed against TensorFlow's.

    .venv/bin/python bench/memory.py [--requests 1000] [--std-requests 100] [--rounds 5] [--skip-apps]
                                     [--skip-speed] [--skip-124m] [--skip-pro] [--apps KEY,...] [--cache-dir DIR]

Part 1, memory: each configuration is the app launched as the README launches it
(``.venv/bin/python app.py`` with its SLM_* variables) in its own process; its RSS is read from outside
(psutil) when it first answers ``/healthz`` (start), once ``/health`` is 200 (model loaded and warmed up),
after 20 requests (warm), and every quarter of the run of N requests (``POST /generate``, 16 new
tokens, temperature 0.8, 4 clients at once, varied prompts): flat is the goal. Errors are any
non-200 answer. Configurations: the free tier (tiny-gpt2 float16) on LiteRT and on TensorFlow; the
standard tier's GPT-2 124M (random weights: real ones are not available offline; fine for speed and
memory) on TensorFlow and on LiteRT float32 and int8; the pro tier (embedded GGUF) when llama.cpp is
installed. LiteRT models are converted before the launch (set-up's job), so no conversion is timed.

Part 2, speed: both backends loaded in one process, requests through the ``Scheduler`` (what the app
runs), rounds alternating between them; ms/token = a 33-token request's time / 33 (its 10-token prefill
included), greedy and sampled (temperature 0.8, fixed seed), medians over the rounds. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPT2_124M = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
WORDS = "the a model small language fox river city seven blue quickly data tokens cache memory light".split()
PROMPT = "The quick brown fox jumps over the lazy dog."
APP_KEYS = ("free-litert", "free-tf", "std-tf", "std-litert-f32", "std-litert-int8", "pro")


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def load_requests(url: str, n: int, clients: int, seed: int) -> int:
    """``n`` POST /generate from ``clients`` threads; returns the number of errors."""
    errors, lock, counter = [0], threading.Lock(), iter(range(n))
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(64)]

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    r = http.post(url + "generate", json={"prompts": prompts[i % 64], "max_tokens": 16,
                                                          "temperature": 0.8})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    with lock:
                        errors[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors[0]


def run_app(label: str, env: dict[str, str], requests: int, cache: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    full_env = {**os.environ, **env, "SLM_CACHE_DIR": str(cache), "GRADIO_SERVER_PORT": str(port)}
    log = open(cache / f"{label}.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    out: dict[str, Any] = {"label": label}
    try:
        started = time.perf_counter()
        wait_for(url + "healthz", proc)
        out["start"] = rss_mb(proc.pid)
        wait_for(url + "health", proc)
        out["loaded"], out["load_s"] = rss_mb(proc.pid), time.perf_counter() - started
        errors = load_requests(url, 20, 4, seed=1)
        out["warm"] = rss_mb(proc.pid)
        quarters = []
        t0 = time.perf_counter()
        for q in range(4):
            errors += load_requests(url, requests // 4, 4, seed=10 + q)
            quarters.append(rss_mb(proc.pid))
            print(f"{label}: {(q + 1) * (requests // 4)} requests, RSS {quarters[-1]:.0f} MB, {errors} errors, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        out["run_s"] = time.perf_counter() - t0
        out["quarters"], out["errors"], out["requests"] = quarters, errors, requests // 4 * 4
        out["health"] = httpx.get(url + "health", timeout=30).json()
    finally:
        proc.terminate()
        proc.wait(timeout=120)
        log.close()
    return out


def speed(pairs: list[tuple[str, dict[str, Any]]], cache: Path, rounds: int) -> list[tuple[str, float, float]]:
    """Decode ms/token (greedy, sampled) for each backend config, rounds alternating."""
    from slm_app.backends import load_backend
    from slm_app.backends.base import SamplingParams
    from slm_app.scheduler import Scheduler
    from slm_app.settings import EngineConfig

    loaded = []
    for label, cfg in pairs:
        backend = load_backend(EngineConfig(cache_dir=cache, n_slots=3, **cfg))
        loaded.append((label, backend, Scheduler(backend, queue_size=4)))
    times: dict[tuple[str, bool], list[float]] = {}

    def timed(backend: Any, scheduler: Any, tokens: int, greedy: bool) -> tuple[float, int]:
        params = SamplingParams(max_new_tokens=tokens, temperature=0.0 if greedy else 0.8, seed=7)
        start = time.perf_counter()
        done = scheduler.submit(backend.tokenize(PROMPT), params).result(timeout=600)
        return time.perf_counter() - start, done.completion_tokens

    for _ in range(rounds):
        for label, backend, scheduler in loaded:
            for greedy in (True, False):
                # Whole request (prefill included) per token: a difference of two requests' times is
                # noise when a backend decodes 32 greedy tokens in one call (TensorFlow's in-graph loop).
                tn, n = timed(backend, scheduler, 33, greedy)
                times.setdefault((label, greedy), []).append(tn / max(1, n) * 1000)
    for _, backend, scheduler in loaded:
        scheduler.close()
    return [(label, statistics.median(times[(label, True)]), statistics.median(times[(label, False)]))
            for label, _, _ in loaded]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="requests per free-tier app")
    ap.add_argument("--std-requests", type=int, default=100, help="requests per standard/pro app (124M is slow)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-apps", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-124m", action="store_true")
    ap.add_argument("--skip-pro", action="store_true")
    ap.add_argument("--apps", default=",".join(APP_KEYS),
                    help=f"which app configurations to launch, comma-separated (default: all of {', '.join(APP_KEYS)})")
    ap.add_argument("--cache-dir", default=None, help="model cache (default: a temporary dir)")
    args = ap.parse_args()
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="bench-memory-"))
    cache.mkdir(parents=True, exist_ok=True)

    from slm_app.provisioning.litert import convert_in_subprocess
    from slm_app.provisioning.tiny_gpt2 import build_random_gpt2
    from slm_app.settings import Settings, Tier, litert_target

    model, free_ctx, _ = litert_target(Settings(tier=Tier.free, backend="litert"))
    convert_in_subprocess(model, cache, free_ctx, "float16")
    convert_in_subprocess(model, cache, free_ctx, "float32")
    gpt2 = std_ctx = None
    if not args.skip_124m:
        gpt2 = str(build_random_gpt2(cache / "gpt2-124m-random", seed=0, **GPT2_124M))
        _, std_ctx, _ = litert_target(Settings(tier=Tier.standard, backend="litert", model=gpt2))
        for weights in ("float32", "int8"):
            convert_in_subprocess(gpt2, cache, std_ctx, weights)

    chosen = set(args.apps.split(","))
    if chosen - set(APP_KEYS):
        ap.error(f"unknown --apps {sorted(chosen - set(APP_KEYS))}; known: {', '.join(APP_KEYS)}")

    def apps(configs: list[tuple[str, str, dict[str, str], int]]) -> None:
        configs = [c for c in configs if c[0] in chosen]
        if not configs:
            return
        print("\n| configuration | start | loaded + warm-up | after 20 requests | after N/4, N/2, 3N/4, N | N | errors "
              "| model |\n|---|---:|---:|---:|---|---:|---:|---|", flush=True)
        for _, label, env, n in configs:
            try:
                r = run_app(label, env, n, cache)
            except Exception as exc:  # a config that cannot run here is reported, not fatal
                print(f"| {label} | failed: {type(exc).__name__}: {exc} |", flush=True)
                continue
            q = " / ".join(f"{x:.0f}" for x in r["quarters"])
            info = r["health"].get("model_info") or {}
            print(f"| {r['label']} | {r['start']:.0f} | {r['loaded']:.0f} | {r['warm']:.0f} | {q} | {r['requests']} | "
                  f"{r['errors']} | {info.get('name', '?')} |", flush=True)
        print("\nRSS in MB, whole process (psutil, read from outside).", flush=True)

    def speeds(pairs: list[tuple[str, dict[str, Any]]]) -> None:
        results = speed(pairs, cache, args.rounds)
        base = [(g, s) for label, g, s in results if "TensorFlow" in label][0]
        print("\n| backend | greedy ms/token | ÷ TensorFlow | sampled ms/token | ÷ TensorFlow |\n|---|---:|---:|---:|---:|")
        for label, g, s in results:
            print(f"| {label} | {g:.3f} | {g / base[0]:.2f} | {s:.3f} | {s / base[1]:.2f} |")
        print(f"\nms/token = a 33-token request's time (prefill of a 10-token prompt included) / 33, through the "
              f"Scheduler, medians of {args.rounds} rounds "
              "alternating backends; ÷ TensorFlow < 1 is faster.", flush=True)

    if not args.skip_apps:
        apps([("free-litert", "free, LiteRT float16", {"SLM_TIER": "free"}, args.requests),
              ("free-tf", "free, TensorFlow float16", {"SLM_TIER": "free", "SLM_BACKEND": "tensorflow"}, args.requests)])
    if not args.skip_speed:
        tiny = dict(model=model, max_prompt_tokens=256, max_new_tokens=96)
        speeds([("tiny-gpt2 float16, LiteRT", dict(backend="litert", litert_weights="float16", **tiny)),
                ("tiny-gpt2 float16, TensorFlow", dict(backend="tensorflow", float16=True, **tiny))])
    if gpt2 and not args.skip_speed:
        std_cfg = dict(model=gpt2, max_prompt_tokens=512, max_new_tokens=192)
        speeds([("124M float32, LiteRT", dict(backend="litert", litert_weights="float32", **std_cfg)),
                ("124M int8, LiteRT", dict(backend="litert", litert_weights="int8", **std_cfg)),
                ("124M float32, TensorFlow", dict(backend="tensorflow", **std_cfg))])
    if not args.skip_apps:
        configs = []
        if gpt2:
            std = {"SLM_TIER": "standard", "SLM_MODEL": gpt2}
            configs += [("std-tf", "standard 124M, TensorFlow float32", {**std, "SLM_BACKEND": "tensorflow"},
                         args.std_requests),
                        ("std-litert-f32", "standard 124M, LiteRT float32",
                         {**std, "SLM_BACKEND": "litert", "SLM_LITERT_WEIGHTS": "float32"}, args.std_requests),
                        ("std-litert-int8", "standard 124M, LiteRT int8",
                         {**std, "SLM_BACKEND": "litert", "SLM_LITERT_WEIGHTS": "int8"}, args.std_requests)]
        if importlib.util.find_spec("llama_cpp") and not args.skip_pro:
            # Offline, the pro tier's hub model falls back to the embedded SmolLM2-135M-Instruct GGUF.
            configs.append(("pro", "pro, llama.cpp (offline fallback)", {"SLM_TIER": "pro", "HF_HUB_OFFLINE": "1"},
                            args.std_requests))
        if configs:
            apps(configs)

if __name__ == "__main__":
    main()
