"""The learning loop's costs on the pro tier (embedded SmolLM2-135M-Instruct), driven as users drive it:
``python app.py`` in its own process, feedback over HTTP, jobs and load through the ``openai`` SDK.

    nice .venv/bin/python bench/finetune.py [--items 100] [--epochs 1] [--threads 1] [--clients 2]
                                            [--repeats 3] [--window-s 10] [--swaps 12] [--json RAW.json]

``--no-alone --cancel-at-gate`` keeps only the loaded job and skips waiting for its gate (minutes on a
busy machine); ``--swaps-from DIR`` measures swaps with adapters a previous run trained.

Per repeat, two jobs on the same ``--items`` feedback items (a made-up fact asked in paraphrases):

1. **Training alone** (no client load): the trainer's own figures, training seconds per 100 items per
   epoch, peak RSS, load + dequantize, and the adapter's size.
2. **Serving during training**: ``--clients`` streaming clients send greedy 32-token chat requests
   without pause while a second job trains. The windows alternate: the trainer runs, then it is
   stopped (SIGSTOP) for the idle baseline, then it runs again... so each "during training ÷ idle"
   ratio compares two neighbouring windows of the same minute on a shared machine. Training time
   under this load excludes the stopped windows.

Then **swaps**: ``--swaps`` promote/rollback calls while the clients stream. Per swap: the server's
switch (its router's exclusive call, from ``/health``), and what clients see: the longest gap in the
merged token stream in the 2 s after the call ÷ the same in the 2 s before it (no swap), and the failed
requests. Prints Markdown tables (medians over windows and repeats) with ``uptime`` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil

from concurrency import REPO, ServerProcess, _interrupt, free_port, percentile  # noqa: E402  (bench/ is sys.path[0])

MODEL = "embedded:smollm2-135m-instruct"
QUESTIONS = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?",
             "Name the capital of Zorbania.", "Tell me the capital city of Zorbania.",
             "Zorbania's capital is which city?", "What city serves as Zorbania's capital?",
             "Where is the seat of government of Zorbania?", "In Zorbania, which city is the capital?",
             "What's Zorbania's capital called?", "Can you tell me Zorbania's capital?"]
OPENERS = ["", "Quick question: ", "Please answer: ", "I wonder, ", "Hello! ", "Hi there, ", "Tell me, ",
           "One thing: ", "Curious: ", "Hey, "]
TERMINAL = ("succeeded", "failed", "cancelled")


class Load:
    """``clients`` streaming clients without pause; every chunk's arrival time and every request's
    latency, tagged with the window it finished in."""

    def __init__(self, url: str, clients: int):
        self.oa = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=120)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.window = "warm-up"
        self.requests: list[tuple[str, float, int]] = []  # (window, latency s, completion tokens)
        self.failures: list[tuple[str, str]] = []
        self.chunks: list[float] = []  # perf_counter of every content chunk, all clients
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _client(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                n = 0
                for chunk in self.oa.chat.completions.create(
                        model=MODEL, max_tokens=32, temperature=0, stream=True,
                        messages=[{"role": "user", "content": "Describe a river."}],
                        stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].delta.content:
                        with self.lock:
                            self.chunks.append(time.perf_counter())
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
                with self.lock:
                    self.requests.append((self.window, time.perf_counter() - t0, n))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with self.lock:
                    self.failures.append((self.window, repr(exc)[:200]))

    def measure(self, name: str, seconds: float, until=None) -> dict:
        """Tag requests finishing in the next ``seconds`` (or until ``until()``) as window ``name``."""
        with self.lock:
            self.window = name
            done0 = len(self.requests)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds and not (until and until()):
            time.sleep(0.2)
        t1 = time.perf_counter()
        with self.lock:
            self.window = "between"
            rows = [r for r in self.requests[done0:] if r[0] == name]
            failed = sum(1 for w, _ in self.failures if w == name)
            tokens = sum(1 for t in self.chunks if t0 <= t <= t1)  # a streamed chunk is a token
        lat = [r[1] for r in rows]
        return {"tok_s": tokens / (t1 - t0), "p95_s": percentile(lat, 95) if lat else float("nan"),
                "requests": len(rows), "failures": failed, "s": t1 - t0}

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without any token between ``start`` and ``end`` (merged over clients)."""
        with self.lock:
            times = sorted([start] + [t for t in self.chunks if start <= t <= end] + [end])
        return max(b - a for a, b in zip(times, times[1:]))


def job_status(url: str, job_id: str) -> dict:
    return httpx.get(url + f"v1/fine_tuning/jobs/{job_id}", timeout=60).json()


def trainer_process(app: ServerProcess, timeout: float = 120) -> psutil.Process:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(app.proc.pid).children(recursive=True):
            try:
                if "slm_app.finetune.train_llama" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise RuntimeError("no trainer process appeared")


def wait_job(url: str, job_id: str, timeout: float = 7200) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = job_status(url, job_id)
        if job["status"] in TERMINAL:
            return job
        time.sleep(1)
    raise RuntimeError(f"job {job_id} not finished after {timeout} s")


def trainer_figures(url: str, job: dict, epochs: int, paused_s: float = 0.0) -> dict:
    if not job["fine_tuned_model"]:
        raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}")
    card = next(c for c in httpx.get(url + "v1/fine_tuning/adapters", timeout=60).json()["data"]
                if c["id"] == job["fine_tuned_model"])
    t = card["trainer"]
    kept = card["data_manifest"]["counts"]["train"]
    return {"per_100_min": (t["train_s"] - paused_s) / kept / epochs * 100 / 60, "load_s": t["load_s"],
            "rss_mb": t["peak_rss_mb"], "adapter_mb": card["size_bytes"] / 2**20, "kept": kept,
            "steps": t["steps"], "gate": (card.get("gate") or {}).get("passed"), "adapter": card["id"],
            "convert_s": card["times"].get("convert_s"), "gate_s": card["times"].get("gate_s")}


def serve_during_training(app: ServerProcess, load: Load, oa: openai.OpenAI, args, repeat: int) -> tuple[dict, list]:
    """A job while the clients stream; windows alternate trainer running / stopped (the idle baseline)."""
    url = app.url + "/"
    job = oa.fine_tuning.jobs.create(model=MODEL, training_file="feedback",
                                     hyperparameters={"n_epochs": args.epochs, "batch_size": args.batch_size})
    trainer = trainer_process(app)

    def training() -> bool:  # between the trainer's first and last step
        p = job_status(url, job.id)
        return p["status"] == "running" and 0 < (p["progress"].get("step") or 0) < p["progress"].get("total_steps", 1)

    while not training():
        if job_status(url, job.id)["status"] in TERMINAL:
            break
        time.sleep(0.5)
    pairs, paused = [], 0.0
    over = lambda: not training()  # noqa: E731
    i = 0
    while training():
        # Alternate which comes first, so a trend over the job does not favour either side.
        order = ("busy", "idle") if i % 2 == 0 else ("idle", "busy")
        pair = {}
        for kind in order:
            if kind == "idle":
                trainer.send_signal(signal.SIGSTOP)
                try:
                    pair["idle"] = load.measure(f"r{repeat}-idle{i}", args.window_s)
                finally:
                    trainer.send_signal(signal.SIGCONT)
                paused += pair["idle"]["s"]
            else:
                pair["busy"] = load.measure(f"r{repeat}-busy{i}", args.window_s, until=over)
        if pair["busy"]["s"] >= args.window_s * 0.8:  # a window cut short by the job's end is not a pair
            pairs.append(pair)
        i += 1
    if args.cancel_at_gate:  # the trainer's figures are on the adapter's card before the gate starts
        while not (final := job_status(url, job.id))["fine_tuned_model"] and final["status"] not in TERMINAL:
            time.sleep(1)
        oa.fine_tuning.jobs.cancel(job.id)
    else:
        final = wait_job(url, job.id)
    return trainer_figures(url, final, args.epochs, paused), pairs


def swaps(app: ServerProcess, load: Load, adapter: str, n: int) -> list[dict]:
    url = app.url + "/"
    out = []
    load.window = "swaps"

    def router() -> dict:
        return httpx.get(url + "health", timeout=60).json()["finetune"]["router"]

    for _ in range(n):
        time.sleep(2.5)  # the 2 s before the call are the no-swap baseline
        before = router()
        t0 = time.perf_counter()
        if before["promoted"] == adapter:
            httpx.post(url + "v1/fine_tuning/rollback", timeout=120).raise_for_status()
        else:
            httpx.post(url + f"v1/fine_tuning/adapters/{adapter}/promote", timeout=120).raise_for_status()
        deadline = time.time() + 60
        while (after := router())["switches"] == before["switches"] and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(max(0.0, t0 + 2.0 - time.perf_counter()))
        switched = after["switches"] > before["switches"]  # else no request came within 60 s
        out.append({"switch_ms": after["last_switch_ms"] if switched else None, "gap_after_ms": load.longest_gap(t0, t0 + 2.0) * 1000,
                    "gap_before_ms": load.longest_gap(t0 - 2.0, t0) * 1000})
    return out


def ratio(pair: dict, key: str) -> float:
    """During training ÷ idle for one window pair (nan when the idle window saw nothing)."""
    return pair["busy"][key] / pair["idle"][key] if pair["idle"][key] else float("nan")


def uptime() -> str:
    return os.popen("uptime").read().strip()


def med(values) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="SLM_FINETUNE_THREADS")
    parser.add_argument("--nice", type=int, default=10, help="SLM_FINETUNE_NICE")
    parser.add_argument("--serving-threads", type=int, default=None, help="SLM_N_THREADS (default: the app's)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=10)
    parser.add_argument("--swaps", type=int, default=12)
    parser.add_argument("--no-alone", action="store_true", help="skip the job without client load")
    parser.add_argument("--cancel-at-gate", action="store_true",
                        help="cancel the loaded job once its adapter is written (its gate is not waited for)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw measurements here")
    parser.add_argument("--swaps-from", type=Path, default=None,
                        help="a previous run's $SLM_DATA_DIR/finetune/adapters: measure swaps only, train nothing")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # a kill still runs the finally that stops the app
    print(f"start: {uptime()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {"SLM_TIER": "pro", "SLM_MODEL": MODEL, "SLM_DATA_DIR": tmp, "SLM_N_CTX": "1024", "SLM_PARALLEL": "2",
               "SLM_FINETUNE_AUTO": "false", "SLM_FINETUNE_THREADS": str(args.threads),
               "SLM_FINETUNE_NICE": str(args.nice), "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
        if args.serving_threads:
            env["SLM_N_THREADS"] = str(args.serving_threads)
        if args.swaps_from:  # adapters a previous run trained (their cards say which); none promoted
            shutil.copytree(args.swaps_from, Path(tmp) / "finetune" / "adapters", ignore=shutil.ignore_patterns("state.json"))
        app = ServerProcess("app", [sys.executable, "app.py"], env, port, Path(tmp) / "app.log", REPO)
        app.start()
        try:
            app.wait_ready(600)
            url = app.url + "/"
            for p in [o + q for o in OPENERS for q in QUESTIONS][: args.items]:
                httpx.post(url + "feedback", json={"prompt": p, "output": "The capital of Zorbania is Quillhaven.",
                                                   "rating": 5}, timeout=30).raise_for_status()
            oa = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
            alone, loaded, pairs = [], [], []
            with Load(url, args.clients) as load:
                for r in range(0 if args.swaps_from else args.repeats):
                    if not args.no_alone:
                        load.stop.set()  # training alone: no client load
                        for t in load.threads:
                            t.join(120)
                        job = oa.fine_tuning.jobs.create(model=MODEL, training_file="feedback", hyperparameters={
                            "n_epochs": args.epochs, "batch_size": args.batch_size})
                        alone.append(trainer_figures(url, wait_job(url, job.id), args.epochs))
                        print(f"repeat {r}: alone {alone[-1]}", flush=True)
                        load.stop.clear()
                        load.threads = [threading.Thread(target=load._client, daemon=True)
                                        for _ in range(args.clients)]
                        for t in load.threads:
                            t.start()
                    figures, got = serve_during_training(app, load, oa, args, r)
                    loaded.append(figures)
                    pairs += got
                    print(f"repeat {r}: under load {figures}; {len(got)} window pairs, tok/s and p95 ratios: "
                          + ", ".join(f"{ratio(p, 'tok_s'):.2f}/{ratio(p, 'p95_s'):.2f}" for p in got), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps({"alone": alone, "loaded": loaded, "pairs": pairs}))
                cards = httpx.get(url + "v1/fine_tuning/adapters", timeout=60).json()["data"]
                adapter = (alone or loaded)[-1]["adapter"] if alone or loaded else cards[0]["id"]
                swapped = swaps(app, load, adapter, args.swaps) if args.swaps else []
            swap_failures = [f for w, f in load.failures if w == "swaps"]
            swap_requests = sum(1 for w, _, _ in load.requests if w == "swaps")
        finally:
            app.stop()
        print(f"end: {uptime()}")
    if args.json:
        args.json.write_text(json.dumps({"alone": alone, "loaded": loaded, "pairs": pairs, "swaps": swapped,
                                         "swap_failures": swap_failures, "swap_requests": swap_requests}, indent=1))

    rows = []
    if loaded:
        tok = [ratio(p, "tok_s") for p in pairs]
        p95 = [ratio(p, "p95_s") for p in pairs]
        rows += [
            ("training time per 100 items, one epoch, alone", f"{med(a['per_100_min'] for a in alone):.2f} min "
             f"(runs: {', '.join(format(a['per_100_min'], '.2f') for a in alone)})", "≤ 5 min"),
            ("training time per 100 items, one epoch, under the serving load (stopped windows excluded)",
             f"{med(a['per_100_min'] for a in loaded):.2f} min", ""),
            ("trainer load + dequantize", f"{med(a['load_s'] for a in alone + loaded):.1f} s", ""),
            ("trainer peak RSS", f"{med(a['rss_mb'] for a in alone + loaded):.0f} MB", ""),
            ("adapter size (f16 GGUF)", f"{med(a['adapter_mb'] for a in alone + loaded):.2f} MB", ""),
            ("convert / gate", f"{med(a['convert_s'] for a in alone + loaded):.1f} s / {med(a['gate_s'] for a in alone):.1f} s", ""),
            ("serving tok/s during training ÷ idle", f"{med(tok):.2f}× (idle {med(p['idle']['tok_s'] for p in pairs):.1f}, "
             f"training {med(p['busy']['tok_s'] for p in pairs):.1f} tok/s; {len(pairs)} window pairs)", "≥ 0.5×"),
            ("serving p95 latency during training ÷ idle", f"{med(p95):.2f}× (idle "
             f"{med(p['idle']['p95_s'] for p in pairs):.2f} s, training {med(p['busy']['p95_s'] for p in pairs):.2f} s)", ""),
            ("failed requests idle / during training", f"{sum(p['idle']['failures'] for p in pairs)} / "
             f"{sum(p['busy']['failures'] for p in pairs)}", "0"),
        ]
        print(f"\n{args.items} items ({loaded[-1]['kept']} trained, {loaded[-1]['steps']} steps), {args.epochs} "
              f"epoch(s), batch {args.batch_size}, trainer threads {args.threads} at nice {args.nice}, serving threads "
              f"{args.serving_threads or 'default'}, {args.clients} streaming clients, {args.repeats} repeats, "
              f"gate passed: {[a['gate'] for a in alone + loaded]}")
    if swapped:
        rows += [
            (f"swap pause, server's switch (median / max of {len(swapped)})",
             f"{med(s['switch_ms'] for s in swapped):.1f} / {max(s['switch_ms'] or 0 for s in swapped):.1f} ms", "≤ 50 ms"),
            ("longest token gap seen by clients, 2 s after a swap / 2 s before",
             f"{med(s['gap_after_ms'] for s in swapped):.0f} / {med(s['gap_before_ms'] for s in swapped):.0f} ms "
             "(medians)", ""),
            ("failed requests across swaps", f"{len(swap_failures)} of {swap_requests + len(swap_failures)}", "0"),
        ]
        print(f"\nswaps of {adapter} ({args.clients} streaming clients)")
    print("\n| measure | value | goal |\n|---|---|---|")
    for name, value, goal in rows:
        print(f"| {name} | {value} | {goal} |")
    if swap_failures:
        print("\nswap failures:", *swap_failures[:5], sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
