"""The learning loop's costs on the pro tier (embedded SmolLM2-135M-Instruct), in one run of the app:

    .venv/bin/python bench/finetune.py [--items 100] [--epochs 1] [--threads 1] [--clients 2] [--swaps 10]

1. ``--items`` feedback items (a made-up fact in paraphrases) go in over HTTP.
2. **Idle serving**: ``--clients`` streaming clients send greedy 32-token chat requests for
   ``--phase-s`` seconds; aggregate tok/s and p95 latency.
3. **Serving during training**: a job starts (``--epochs``, ``SLM_FINETUNE_THREADS=--threads``, nice 10)
   and the same load runs while its trainer is between its first and last step.
4. The trainer's own figures: training seconds per 100 items per epoch, peak RSS, the adapter's size.
5. **Swaps**: ``--swaps`` promote/rollback cycles while the clients stream; each switch's pause
   (the router's exclusive call: drain wait excluded, adapter set + graph re-reserve on the next step
   included) and the failed requests across them.

Ratios (during training ÷ idle) come from the same run; the machine is shared, so repeat and compare
medians. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from slm_app.server import build_app, serve_in_thread  # noqa: E402
from slm_app.settings import Settings  # noqa: E402

MODEL = "embedded:smollm2-135m-instruct"
QUESTIONS = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?",
             "Name the capital of Zorbania.", "Tell me the capital city of Zorbania.",
             "Zorbania's capital is which city?", "What city serves as Zorbania's capital?",
             "Where is the seat of government of Zorbania?", "In Zorbania, which city is the capital?",
             "What's Zorbania's capital called?", "Can you tell me Zorbania's capital?"]
OPENERS = ["", "Quick question: ", "Please answer: ", "I wonder, ", "Hello! ", "Hi there, ", "Tell me, ",
           "One thing: ", "Curious: ", "Hey, "]


def load_phase(url: str, clients: int, seconds: float, stop_when=None) -> dict:
    """Streaming clients for ``seconds`` (or until ``stop_when()``): tok/s, p95 latency, failures."""
    oa = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
    latencies, tokens, failures = [], [0], [0]
    end = time.perf_counter() + seconds
    lock = threading.Lock()

    def client() -> None:
        while time.perf_counter() < end and not (stop_when and stop_when()):
            t0 = time.perf_counter()
            try:
                n = 0
                for chunk in oa.chat.completions.create(model=MODEL, max_tokens=32, temperature=0, stream=True,
                                                        messages=[{"role": "user", "content": "Describe a river."}],
                                                        stream_options={"include_usage": True}):
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens[0] += n
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    failures[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"tok_s": tokens[0] / elapsed, "p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else float("nan"),
            "requests": len(lat), "failures": failures[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--phase-s", type=float, default=60)
    parser.add_argument("--swaps", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(tier="pro", model=MODEL, data_dir=tmp, n_ctx=1024, parallel=2, finetune_auto=False,
                            finetune_threads=args.threads)
        server = serve_in_thread(build_app(settings))
        try:
            assert server.service.wait_until_loaded(600), server.service.load_error
            url = server.url
            prompts = [o + q for o in OPENERS for q in QUESTIONS][: args.items]
            for p in prompts:
                httpx.post(url + "feedback", json={"prompt": p, "output": "The capital of Zorbania is Quillhaven.",
                                                   "rating": 5}, timeout=30).raise_for_status()
            idle = load_phase(url, args.clients, args.phase_s)
            oa = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
            job = oa.fine_tuning.jobs.create(model=MODEL, training_file="feedback",
                                             hyperparameters={"n_epochs": args.epochs, "batch_size": 4})

            def progress() -> dict:
                return httpx.get(url + f"v1/fine_tuning/jobs/{job.id}", timeout=30).json()

            while not (progress().get("progress") or {}).get("step") and progress()["status"] == "running":
                time.sleep(1)
            busy = load_phase(url, args.clients, args.phase_s,
                              stop_when=lambda: progress()["status"] != "running"
                              or progress()["progress"].get("step") == progress()["progress"].get("total_steps"))
            while progress()["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(2)
            final = progress()
            if final["status"] != "succeeded":
                print(f"job {final['status']}: {final['error']}")
                return 1
            adapter = final["fine_tuned_model"]
            card = next(c for c in httpx.get(url + "v1/fine_tuning/adapters").json()["data"] if c["id"] == adapter)
            trainer = card["trainer"]
            kept = card["data_manifest"]["counts"]["train"]

            pauses, stop = [], threading.Event()
            swap_load: dict = {}
            loader = threading.Thread(target=lambda: swap_load.update(
                load_phase(url, args.clients, 3600, stop_when=stop.is_set)))
            loader.start()
            router = server.service.engine.router
            for i in range(args.swaps):
                before = router.switches
                if i % 2 == 0:
                    httpx.post(url + "v1/fine_tuning/rollback", timeout=120).raise_for_status()
                else:
                    httpx.post(url + f"v1/fine_tuning/adapters/{adapter}/promote", timeout=120).raise_for_status()
                deadline = time.time() + 60
                while router.switches == before and time.time() < deadline:
                    time.sleep(0.05)
                pauses.append(router.last_switch_ms)
            stop.set()
            loader.join()
        finally:
            server.stop()

    per_100 = trainer["train_s"] / max(kept, 1) / args.epochs * 100
    rows = [
        ("training time per 100 items (one epoch)", f"{per_100 / 60:.1f} min", "≤ 5 min"),
        ("trainer load + dequantize", f"{trainer['load_s']:.0f} s", ""),
        ("trainer peak RSS", f"{trainer['peak_rss_mb']:.0f} MB", ""),
        ("adapter size (f16 GGUF)", f"{card['size_bytes'] / 2**20:.1f} MB", ""),
        ("serving tok/s idle → during training", f"{idle['tok_s']:.1f} → {busy['tok_s']:.1f} "
                                                 f"({busy['tok_s'] / idle['tok_s']:.2f}×)", "≥ 0.5×"),
        ("serving p95 latency idle → during training", f"{idle['p95_s']:.2f} → {busy['p95_s']:.2f} s "
                                                       f"({busy['p95_s'] / idle['p95_s']:.2f}×)", ""),
        ("swap pause (median / max of %d)" % len(pauses),
         f"{statistics.median(pauses):.1f} / {max(pauses):.1f} ms", "≤ 50 ms"),
        ("failed requests across swaps", f"{swap_load.get('failures')} of {swap_load.get('requests')}", "0"),
        ("failed requests idle / during training", f"{idle['failures']} / {busy['failures']}", "0"),
    ]
    print(f"\n{args.items} items ({kept} trained), {args.epochs} epoch(s), trainer threads {args.threads}, "
          f"{args.clients} streaming clients\n")
    print("| measure | value | goal |\n|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
