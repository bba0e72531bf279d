"""The evaluation gate: a candidate adapter against what is served now, on the served model itself.

Every figure comes from llama.cpp with the adapter applied (the GGUF adapter users would get, not
the torch model it came from), through the serving core: scoring in exclusive calls on the
scheduler's thread (``AdapterRouter.with_adapter``, one example per call so requests interleave),
generations as ordinary requests that name the adapter.

* **new data**: mean negative log-likelihood (and perplexity) of the held-out answers' tokens given
  their prompts, and the summed log-likelihood of each answer (what a test can compare per item);
* **regression**: perplexity of a fixed general text (``slm_app/data/regression.txt``);
* **checks**: the behavioural checks (``slm_app/data/checks.jsonl``, ``slm_app.evaluate``'s judge);
* **ROUGE-L**: greedy answers to the held-out prompts against their reference (corrected) answers.

Promotion needs the new data's loss to fall by at least ``SLM_FINETUNE_MIN_IMPROVEMENT`` (0.1 = 10 %
of its value) and the regression perplexity to rise by at most ``SLM_FINETUNE_MAX_REGRESSION`` (0.05). Checks and ROUGE-L are reported on the card.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from slm_app import conversation, evaluate
from slm_app.errors import raise_failure
from slm_app.finetune.serving import BASE, AdapterRouter
from slm_app.service import GenerationService

REGRESSION_TEXT = "regression.txt"
MAX_ROUGE_ITEMS = 4
GATE_TOKENS = 24  # answers of checks and ROUGE-L: enough to judge, short enough to keep the gate quick


def answer_loglik(router: AdapterRouter, adapter: str | None, example: dict[str, Any]) -> tuple[float, int]:
    """Summed log-probability of ``ids[start:]`` given what precedes, and how many tokens that is."""
    ids, start = example["ids"], example["start"]
    logprobs = router.with_adapter(adapter, lambda backend: backend.score(ids))
    # score() gives log P(ids[j+1] | ids[:j+1]) at j: the answer's tokens are j >= start - 1.
    part = np.asarray(logprobs[start - 1:], dtype=np.float64)
    return float(part.sum()), int(part.size)


def regression_ppl(service: GenerationService, router: AdapterRouter, adapter: str | None, text: str) -> float:
    engine = service.ready()
    tokens = engine.tokenize(text)[: engine.info().n_ctx]
    logprobs = router.with_adapter(adapter, lambda backend: backend.score(tokens))
    return float(math.exp(-float(np.mean(logprobs))))


def _generate(service: GenerationService, adapter: str | None, prompt: str | conversation.Rendered) -> str:
    """Greedy output under ``adapter``: of a raw prompt (formatted as a Generate prompt is), or of a
    rendered conversation (with the stop strings its rendering needs)."""
    params = dataclasses.replace(service.sampling(GATE_TOKENS, 0.0, 1.0, seed=0), adapter=adapter or BASE)
    if isinstance(prompt, conversation.Rendered):
        params, prompt = prompt.with_stops(params), prompt.prompt
    prepared = service.check_prompt(prompt, params.use_chat_template)
    final = service.start("finetune_gate", prepared, params).result()
    raise_failure(final)
    return final.text.strip()


def measure(service: GenerationService, router: AdapterRouter, adapter: str | None,
            examples: Sequence[dict[str, Any]], chats: Sequence[dict[str, Any]],
            stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Every gate figure for ``adapter`` (None: the base model)."""
    logliks = []
    total, count = 0.0, 0
    for example in examples:
        if stop():
            raise InterruptedError("cancelled")
        ll, n = answer_loglik(router, adapter, example)
        logliks.append(round(ll, 4))
        total, count = total + ll, count + n
    nll = -total / max(count, 1)
    reg = regression_ppl(service, router, adapter, evaluate.default_data(REGRESSION_TEXT))
    checks = []
    for check in evaluate.parse_checks(evaluate.default_data(evaluate.DEFAULT_CHECKS)):
        if stop():
            raise InterruptedError("cancelled")
        output = _generate(service, adapter, check.prompt)
        checks.append({"name": check.name, "passed": all(ok for _, ok, _ in evaluate.judge(output, check.expect))})
    rouge = []
    for chat in list(chats)[:MAX_ROUGE_ITEMS]:
        if stop():
            raise InterruptedError("cancelled")
        if "messages" not in chat:
            continue
        output = _generate(service, adapter, conversation.render(service, chat["messages"][:-1]))
        rouge.append(evaluate.rouge_l(chat["messages"][-1]["content"], output)["f1"])
    return {
        "new_data_nll": round(nll, 5),
        "new_data_ppl": round(math.exp(min(nll, 700)), 4),
        "new_data_tokens": count,
        "answer_logliks": logliks,
        "regression_ppl": round(reg, 4),
        "checks_passed": sum(c["passed"] for c in checks),
        "checks_total": len(checks),
        "checks": checks,
        "rougeL_f1": round(float(np.mean(rouge)), 4) if rouge else None,
    }


def decide(before: dict[str, Any], after: dict[str, Any], max_regression: float,
           min_improvement: float = 0.0) -> tuple[bool, list[str]]:
    """(promote?, the reasons, each a sentence). The held-out loss must fall by at least
    ``min_improvement`` of its value (SLM_FINETUNE_MIN_IMPROVEMENT)."""
    reasons = []
    ok = True
    fall = 1 - after["new_data_nll"] / before["new_data_nll"] if before["new_data_nll"] > 0 else 0.0
    if after["new_data_nll"] < before["new_data_nll"] and fall >= min_improvement:
        reasons.append(f"new-data loss improved: {before['new_data_nll']:.4f} -> {after['new_data_nll']:.4f} "
                       f"(-{fall:.1%}, at least -{min_improvement:.0%} needed)")
    else:
        ok = False
        reasons.append(f"new-data loss did not improve enough: {before['new_data_nll']:.4f} -> "
                       f"{after['new_data_nll']:.4f} ({-fall:+.1%}, at least -{min_improvement:.0%} needed)")
    limit = before["regression_ppl"] * (1 + max_regression)
    change = after["regression_ppl"] / before["regression_ppl"] - 1
    if after["regression_ppl"] <= limit:
        reasons.append(f"regression perplexity {before['regression_ppl']:.3f} -> {after['regression_ppl']:.3f} "
                       f"({change:+.1%}, allowed +{max_regression:.0%})")
    else:
        ok = False
        reasons.append(f"regression perplexity worsened too much: {before['regression_ppl']:.3f} -> "
                       f"{after['regression_ppl']:.3f} ({change:+.1%}, allowed +{max_regression:.0%})")
    return ok, reasons
