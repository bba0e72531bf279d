"""What LoRA costs the TensorFlow GPT-2 backend when serving (slm_app.backends.tf_lora).

    .venv/bin/python bench/tf_lora.py [--repeats 5] [--tokens 32] [--skip-124m] [--skip-training]

Per model (tiny-gpt2 float32, and a randomly initialised GPT-2 124M on the decode kernels), two
backends in one process, interleaved round by round: ``SLM_TF_LORA_RANK=0`` (no LoRA ops compiled)
and rank 8 (the default), the latter with no adapter (zero factors) and with a rank-8 adapter
applied. Greedy decode ms/token after a short prompt (``decode_greedy`` in calls of
``max_greedy_steps``, as the scheduler runs it), medians over the rounds; then the swap itself:
``set_adapter`` (assigning the variables) to the adapter and back, and a first ``load_adapter``
(reading and checking the .npz), medians of 20. Random weights: speed only. Prints a markdown table.

Then the trainer (``python -m slm_app.finetune.train_tf``, as a job runs it, at nice 10 with
``--threads``): one epoch of 100 chat items (a made-up fact in paraphrases, the transcript format the
TensorFlow tier renders chats in, ~31 tokens each), batch 4, rank 8, per model (also a 256-wide
2-layer GPT-2): load time, training time, first and last loss, peak RSS (the process's own).
"""


from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slm_app.backends.base import Row  # noqa: E402
from slm_app.backends.tf_gpt2 import TFGPT2Backend  # noqa: E402
from slm_app.backends.tf_lora import TARGETS, target_shapes, write_adapter  # noqa: E402
from slm_app.provisioning.tiny_gpt2 import build_offline_tiny_gpt2, build_random_gpt2  # noqa: E402
from slm_app.settings import EngineConfig  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog."
GPT2_124M = {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}


def backend(folder: Path, cache: Path, rank: int) -> TFGPT2Backend:
    return TFGPT2Backend.load(EngineConfig(backend="tensorflow", model=str(folder), cache_dir=cache, n_slots=2,
                                           max_prompt_tokens=64, max_new_tokens=64, warmup=False, lora_rank=rank))


def decode_ms(b: TFGPT2Backend, tokens: int) -> float:
    ids = b.tokenize(PROMPT)
    token, pos = b.forward([Row(0, ids, 0, prompt=True)]).argmax(0), len(ids)
    start, done = time.perf_counter(), 0
    while done < tokens:
        k = min(b.max_greedy_steps(), tokens - done)
        token = int(b.decode_greedy([Row(0, [token], pos)], k)[0][-1])
        pos, done = pos + k, done + k
    elapsed = time.perf_counter() - start
    b.release(0)
    return elapsed * 1000 / tokens


def adapter(path: Path, n_layer: int, n_embd: int, rank: int = 8) -> Path:
    rng = np.random.default_rng(0)
    factors = {}
    for i in range(n_layer):
        for t in TARGETS:
            n_in, n_out = target_shapes(n_embd)[t]
            factors[f"{i}.{t}.A"] = rng.normal(0, 0.02, (n_in, rank))
            factors[f"{i}.{t}.B"] = rng.normal(0, 0.02, (rank, n_out))
    write_adapter(path, factors, rank, 2 * rank, n_layer, n_embd)
    return path


def measure(name: str, folder: Path, cache: Path, repeats: int, tokens: int, tmp: Path) -> str:
    plain, lora = backend(folder, cache, 0), backend(folder, cache, 8)
    info = lora.info().details
    cfg = json.loads((Path(info["model_path"]) / "config.json").read_text())
    file = adapter(tmp / f"{name}.npz", cfg["n_layer"], cfg["n_embd"])
    lora.load_adapter("a", str(file))
    for b in (plain, lora):  # compile the shapes this run uses
        decode_ms(b, tokens)
    lora.set_adapter("a")
    decode_ms(lora, tokens)
    lora.set_adapter(None)
    times: dict[str, list[float]] = {"rank 0": [], "rank 8, no adapter": [], "rank 8, adapter": []}
    for _ in range(repeats):
        times["rank 0"].append(decode_ms(plain, tokens))
        times["rank 8, no adapter"].append(decode_ms(lora, tokens))
        lora.set_adapter("a")
        times["rank 8, adapter"].append(decode_ms(lora, tokens))
        lora.set_adapter(None)
    swaps, loads = [], []
    for i in range(20):
        start = time.perf_counter()
        lora.set_adapter("a")
        lora.set_adapter(None)
        swaps.append((time.perf_counter() - start) * 1000 / 2)
        start = time.perf_counter()
        lora.load_adapter(f"fresh{i}", str(file))
        loads.append((time.perf_counter() - start) * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["rank 0"]
    row = (f"| {name} ({info['matvec_kernel'].split(' ')[0]} kernel) | {base:.3f} | {med['rank 8, no adapter']:.3f} "
           f"({med['rank 8, no adapter'] / base:.2f}x) | {med['rank 8, adapter']:.3f} ({med['rank 8, adapter'] / base:.2f}x) "
           f"| {statistics.median(swaps):.2f} | {statistics.median(loads):.2f} | {os.path.getsize(file):,} |")
    plain.close()
    lora.close()
    return row


def training_rows(models: dict[str, Path], tmp: Path, threads: int) -> list[str]:
    from slm_app.backends.gpt2_vocab import gpt2_tokenizer

    tok = gpt2_tokenizer()
    questions = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?",
                 "Name the capital of Zorbania.", "Tell me the capital city of Zorbania.",
                 "Zorbania's capital is which city?", "What city serves as Zorbania's capital?",
                 "Where is the seat of government of Zorbania?", "In Zorbania, which city is the capital?",
                 "What's Zorbania's capital called?", "Can you tell me Zorbania's capital?"]
    openers = ["", "Quick question: ", "Please answer: ", "Hello! ", "I wonder, ", "Hi, ", "Say, ", "Now: ",
               "OK: ", "Well, "]
    answer = tok.encode(" The capital of Zorbania is Quillhaven.") + [tok.eos_token_id]
    items = []
    for o in openers:
        for q in questions:
            prompt = tok.encode(f"User: {o}{q}\nAssistant:")
            items.append({"ids": prompt + answer, "start": len(prompt)})
    (tmp / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in items))
    rows = []
    for name, folder in models.items():
        config = tmp / f"{folder.name}.json"
        config.write_text(json.dumps({"model_path": str(folder), "out_dir": str(tmp / f"out-{folder.name}"),
                                      "train_file": str(tmp / "train.jsonl"), "epochs": 1, "batch_size": 4,
                                      "learning_rate": 1e-2, "rank": 8, "alpha": 16, "threads": threads}))
        done = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "slm_app.finetune.train_tf", str(config)],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        losses = [r["loss"] for r in lines if r.get("event") == "progress" and r.get("loss") is not None]
        result = next(r for r in lines if r.get("event") == "done")
        rows.append(f"| {name} | {result['trainable_parameters']:,} | {result['load_s']:.1f} | {result['train_s']:.1f} "
                    f"| {losses[0]:.2f} → {losses[-1]:.2f} | {result['peak_rss_mb']:,.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--skip-124m", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="the trainer's threads")
    parser.add_argument("--skip-training", action="store_true", help="the serving table only")
    args = parser.parse_args()
    cache = Path.home() / ".cache" / "slm_app"
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        models = {"tiny-gpt2": build_offline_tiny_gpt2(tmp / "tiny")}
        if not args.skip_124m:
            models["GPT-2 124M (random)"] = build_random_gpt2(tmp / "gpt2-124m", seed=0, **GPT2_124M)
        rows = [measure(name, folder, cache, args.repeats, args.tokens, tmp) for name, folder in models.items()]
        load_serving = os.getloadavg()[0]
        train_models = {"tiny-gpt2": models["tiny-gpt2"],
                        "GPT-2 256 wide, 2 layers (random)": build_random_gpt2(
                            tmp / "wide", seed=2, **dict(GPT2_124M, n_embd=256, n_layer=2, n_head=4))}
        if not args.skip_124m:
            train_models["GPT-2 124M (random)"] = models["GPT-2 124M (random)"]
        train = [] if args.skip_training else training_rows(train_models, tmp, args.threads)
    print(f"load: {load_serving:.2f} (1-min average, {os.cpu_count()} cores); {args.tokens} greedy tokens, "
          f"medians of {args.repeats} interleaved rounds\n")
    print("| model | decode ms/token, rank 0 (no LoRA ops) | rank 8, no adapter | rank 8, adapter applied "
          "| swap (assign) ms | load .npz ms | adapter bytes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(row)
    if not train:
        return
    print(f"\nTrainer, one epoch of 100 items, batch 4, rank 8, {args.threads} threads at nice 10; load after: "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| model | LoRA parameters | load s | train s (100 items) | loss first → last step | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in train:
        print(row)


if __name__ == "__main__":
    main()
