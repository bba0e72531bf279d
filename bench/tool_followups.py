"""Tool-call follow-ups: after a tool result, does the model answer, or call the tool again?

    .venv/bin/python bench/tool_followups.py [--llama-server PATH] [--seeds 3] [--temperature 0.7]
        [--max-tokens 128] [--only app|llama-server] [--json OUT]

Twenty conversations, each already holding a user's question, the assistant's call of a tool and the
tool's result (``role: "tool"``), are sent with ``tool_choice`` left to auto and
``parallel_tool_calls: false`` to two OpenAI-compatible servers on the same GGUF (the embedded
SmolLM2-135M-Instruct) and the same chat template (the GGUF's own):

- the app (pro tier, llama.cpp backend), in this process, through its ``/v1/chat/completions``;
- llama.cpp's ``llama-server --jinja`` (its tool-call support: for a template without native tools,
  its generic JSON format, ``{"tool_call": ...}`` or ``{"response": ...}``, under a grammar).

Each conversation runs greedy once and at ``--temperature`` with ``--seeds`` seeds. A run counts as
"answered" when the reply is text, "same tool again" / "other tool" when it calls, "mentions the
result" when the text holds the result's key fact. Both servers run at once and every request goes to
one then the other (same load). llama-server is the bench-only build (never part
of set-up; see bench/concurrency.py): default /work/peers/.../build/bin/llama-server or $LLAMA_SERVER.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_LLAMA_SERVER = os.environ.get(
    "LLAMA_SERVER", "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server")


def _tool(name: str, description: str, **props: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": "string", "description": v} for k, v in props.items()},
        "required": list(props)}}}


WEATHER = _tool("get_weather", "Get the current weather in a city", city="The city, e.g. Paris")
TIME = _tool("get_time", "Get the current time in a timezone", timezone="An IANA timezone, e.g. Europe/Paris")
SEARCH = _tool("search_web", "Search the web and return the top result", query="What to search for")
CONVERT = _tool("convert_currency", "Convert an amount between currencies", amount="The amount, e.g. 20",
                source="Currency code, e.g. USD", target="Currency code, e.g. EUR")
STOCK = _tool("get_stock_price", "Get the latest price of a stock", ticker="The ticker symbol, e.g. AAPL")
CALC = _tool("calculate", "Evaluate an arithmetic expression", expression="e.g. 12*7")
DEFINE = _tool("define_word", "Look up the definition of an English word", word="The word")
TRANSLATE = _tool("translate", "Translate a text", text="The text", language="The target language")

# (tools, question, the call made, its result, the key fact an answer should mention)
CASES: list[tuple[list[dict], str, str, dict[str, str], str, str]] = [
    ([WEATHER, TIME], "What's the weather in Paris?", "get_weather", {"city": "Paris"},
     '{"temperature_c": 18, "condition": "light rain"}', "18"),
    ([WEATHER, TIME], "Is it sunny in Madrid right now?", "get_weather", {"city": "Madrid"},
     '{"temperature_c": 31, "condition": "sunny"}', "sunny"),
    ([WEATHER], "How cold is it in Oslo?", "get_weather", {"city": "Oslo"},
     '{"temperature_c": -7, "condition": "snow"}', "-7"),
    ([WEATHER, SEARCH], "Should I take an umbrella in London today?", "get_weather", {"city": "London"},
     '{"temperature_c": 12, "condition": "heavy rain"}', "rain"),
    ([TIME, WEATHER], "What time is it in Tokyo?", "get_time", {"timezone": "Asia/Tokyo"},
     '{"time": "21:45", "date": "2026-12-04"}', "21:45"),
    ([TIME], "What time is it in New York?", "get_time", {"timezone": "America/New_York"},
     '{"time": "07:45"}', "7:45"),
    ([TIME, CALC], "Is it morning in Sydney?", "get_time", {"timezone": "Australia/Sydney"},
     '{"time": "23:45"}', "23:45"),
    ([SEARCH], "Who wrote Pride and Prejudice?", "search_web", {"query": "author of Pride and Prejudice"},
     '{"title": "Pride and Prejudice", "snippet": "a novel by Jane Austen, published in 1813"}', "Austen"),
    ([SEARCH, DEFINE], "When was the Eiffel Tower built?", "search_web", {"query": "Eiffel Tower construction date"},
     '{"snippet": "The Eiffel Tower was built from 1887 to 1889."}', "1889"),
    ([SEARCH], "What is the capital of Australia?", "search_web", {"query": "capital of Australia"},
     '{"snippet": "Canberra is the capital city of Australia."}', "Canberra"),
    ([CONVERT], "How much is 20 US dollars in euros?", "convert_currency",
     {"amount": "20", "source": "USD", "target": "EUR"}, '{"result": 18.4, "currency": "EUR"}', "18.4"),
    ([CONVERT, STOCK], "Convert 100 pounds to yen.", "convert_currency",
     {"amount": "100", "source": "GBP", "target": "JPY"}, '{"result": 19120, "currency": "JPY"}', "19"),
    ([STOCK], "What's Apple's stock price?", "get_stock_price", {"ticker": "AAPL"},
     '{"ticker": "AAPL", "price": 231.5, "currency": "USD"}', "231"),
    ([STOCK, SEARCH], "How is Microsoft trading today?", "get_stock_price", {"ticker": "MSFT"},
     '{"price": 418.2, "change_percent": 1.3}', "418"),
    ([CALC], "What is 12 times 7?", "calculate", {"expression": "12*7"}, '{"value": 84}', "84"),
    ([CALC, CONVERT], "What's 15% of 80?", "calculate", {"expression": "0.15*80"}, '{"value": 12}', "12"),
    ([DEFINE], "What does 'ephemeral' mean?", "define_word", {"word": "ephemeral"},
     '{"definition": "lasting for a very short time"}', "short"),
    ([DEFINE, TRANSLATE], "Define the word 'lucid'.", "define_word", {"word": "lucid"},
     '{"definition": "expressed clearly; easy to understand"}', "clear"),
    ([TRANSLATE], "How do you say 'good morning' in Spanish?", "translate",
     {"text": "good morning", "language": "Spanish"}, '{"translation": "buenos días"}', "buenos"),
    ([TRANSLATE, DEFINE], "Translate 'thank you' into German.", "translate",
     {"text": "thank you", "language": "German"}, '{"translation": "danke"}', "danke"),
]


def messages_of(case: tuple) -> list[dict[str, Any]]:
    _tools, question, name, arguments, result, _fact = case
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result}]


def classify(message: Any, finish: str, case: tuple) -> str:
    name, fact = case[2], case[5]
    if message.tool_calls:
        return "same tool again" if any(c.function.name == name for c in message.tool_calls) else "other tool"
    text = (message.content or "").strip()
    if not text or finish == "length":
        return "empty or cut off"
    return "answered, mentions the result" if fact.lower() in text.lower() else "answered"


def run_all(servers: list[tuple[openai.OpenAI, str, str]], runs: list[tuple[float, int | None]], max_tokens: int
            ) -> list[dict[str, Any]]:
    """Every case and run on each server (client, model, label) in turn: interleaved, so both see the
    same machine load."""
    rows = []
    for i, case in enumerate(CASES):
        for temperature, seed in runs:
            for client, model, label in servers:
                start = time.perf_counter()
                try:
                    r = client.chat.completions.create(model=model, messages=messages_of(case), tools=case[0],
                                                       tool_choice="auto", parallel_tool_calls=False,
                                                       temperature=temperature, seed=seed, max_tokens=max_tokens)
                    choice = r.choices[0]
                    outcome, text = classify(choice.message, choice.finish_reason, case), (
                        choice.message.content
                        or json.dumps([c.function.model_dump() for c in choice.message.tool_calls or []]))
                except openai.APIError as exc:
                    outcome, text = "error", str(exc)[:200]
                rows.append({"server": label, "case": i, "temperature": temperature, "seed": seed,
                             "outcome": outcome, "text": text, "seconds": round(time.perf_counter() - start, 2)})
                print(f"[{label}] case {i} t={temperature} seed={seed}: {outcome}: {text[:90]!r}", file=sys.stderr)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(binary: str, gguf: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([binary, "-m", gguf, "--jinja", "-t", "2", "-c", "4096", "-np", "1", "--host",
                             "127.0.0.1", "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("llama-server did not become ready in 120 s")


def rows_from_log(path: Path) -> list[dict[str, Any]]:
    """The rows of ``run_all``'s progress lines ("[server] case i t=T seed=S: outcome: text")."""
    import re

    line_re = re.compile(r"^\[(.+?)\] case (\d+) t=([\d.]+) seed=(\S+): (.+?): ")
    rows = []
    for line in path.read_text().splitlines():
        if m := line_re.match(line):
            rows.append({"server": m[1], "case": int(m[2]), "temperature": float(m[3]), "seed": m[4],
                         "outcome": m[5]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    outcomes = ["answered, mentions the result", "answered", "same tool again", "other tool", "empty or cut off",
                "error"]
    lines = ["| server | sampling | runs | answered (of which mention the result) | same tool again | other tool "
             "| empty / cut off | error |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        kind = "greedy" if r["temperature"] == 0 else f"T={r['temperature']}"
        for key in ((r["server"], kind), (r["server"], "all")):
            groups.setdefault(key, []).append(r)
    for (server, kind), group in groups.items():
        n = len(group)
        count = {o: sum(r["outcome"] == o for r in group) for o in outcomes}
        answered = count["answered"] + count["answered, mentions the result"]
        lines.append(f"| {server} | {kind} | {n} | **{answered}** ({100 * answered / n:.0f}%; "
                     f"{count['answered, mentions the result']}) | {count['same tool again']} | {count['other tool']} "
                     f"| {count['empty or cut off']} | {count['error']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", default=DEFAULT_LLAMA_SERVER)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--only", choices=["app", "llama-server"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table-from", type=Path, nargs="+", metavar="LOG",
                    help="only print the table of earlier runs' progress lines (their stderr; a run cut short too)")
    args = ap.parse_args()
    if args.table_from:
        print(table([row for log in args.table_from for row in rows_from_log(log)]))
        return
    runs: list[tuple[float, int | None]] = [(0.0, 0)] + [(args.temperature, s) for s in range(1, args.seeds + 1)]

    from slm_app.provisioning.embedded import smollm2_gguf

    gguf = str(smollm2_gguf())
    # A stopped run (SIGTERM) still stops llama-server and the app: the ExitStack below unwinds.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: list[tuple[openai.OpenAI, str, str]] = []
    with contextlib.ExitStack() as stack:
        if args.only != "llama-server":
            from slm_app.server import build_app, serve_in_thread
            from slm_app.settings import Settings

            os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
            cache = stack.enter_context(tempfile.TemporaryDirectory())
            settings = Settings(tier="pro", backend="llama.cpp", model="embedded:smollm2-135m-instruct",
                                cache_dir=cache, parallel=1)
            server = serve_in_thread(build_app(settings))
            stack.callback(server.stop)
            if not server.service.wait_until_loaded(timeout=600):
                sys.exit(f"app did not load: {server.service.load_error}")
            client = openai.OpenAI(base_url=server.url + "v1", api_key="unused", max_retries=0, timeout=300)
            servers.append((client, client.models.list().data[0].id, "app"))
        if args.only != "app":
            if not Path(args.llama_server).is_file():
                print(f"llama-server not found at {args.llama_server}: its column is skipped", file=sys.stderr)
            else:
                log = Path(tempfile.gettempdir()) / "tool_followups_llama_server.log"
                proc, url = start_llama_server(args.llama_server, gguf, log)
                stack.callback(proc.wait, 30)
                stack.callback(proc.terminate)
                client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
                servers.append((client, "smollm2", "llama-server --jinja"))
        rows = run_all(servers, runs, args.max_tokens)
    print(f"{len(CASES)} follow-ups (a tool result last, tool_choice auto), greedy + {args.seeds} seeds at "
          f"T={args.temperature}, max_tokens {args.max_tokens}, SmolLM2-135M-Instruct Q4_1 ({gguf})")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
