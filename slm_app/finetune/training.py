"""What every trainer process shares (``train_llama``, ``train_tf``): the examples it reads, the
batches, and the epoch loop that reports progress as JSON lines on stdout, which
``slm_app.finetune.jobs`` turns into the job's progress, loss curve and events.

Examples arrive tokenized by the serving model's own tokenizer: ``{"ids": [...], "start": k}`` per
line, the loss on ``ids[k:]`` only (the answer and its end token). Progress lines:
``{"event": "progress", "step", "total_steps", "epoch", "loss", "val_loss", "eta_s", "elapsed_s"}``;
``status`` and ``error`` lines carry a message, ``done`` the result. This module imports no ML
framework: each trainer brings its own.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def read_examples(path: str) -> list[dict[str, Any]]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def batches(examples: list[dict[str, Any]], size: int, rng: random.Random | None) -> list[list[dict[str, Any]]]:
    order = list(examples)
    if rng is not None:
        rng.shuffle(order)
    return [order[i:i + size] for i in range(0, len(order), size)]


def examples(cfg: dict[str, Any], trainable: int, t_start: float) -> tuple[list, list] | None:
    """Once the model is loaded: say so, and read the training and validation examples (None, with
    an error line, when there is nothing to train on)."""
    emit("status", message=f"loaded in {time.perf_counter() - t_start:.1f} s; {trainable:,} trainable LoRA parameters")
    train = read_examples(cfg["train_file"])
    if not train:
        emit("error", message="no training examples")
        return None
    return train, read_examples(cfg.get("validation_file", ""))


def done(result: dict[str, Any], train: list, val: list, trainable: int, load_s: float, threads: int,
         versions: dict[str, str], **extra: Any) -> None:
    """The trainer's last line: ``run_epochs``' result, the data's size, peak RSS, library versions."""
    emit("done", **result, **extra, train_examples=len(train), validation_examples=len(val),
         trainable_parameters=trainable, load_s=round(load_s, 1), threads=threads, versions=versions,
         peak_rss_mb=peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's VmHWM, not ``ru_maxrss``: after fork + exec that keeps the
    parent's peak when it was higher (a trainer started by a 1.5 GB server reported 1.5 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_main(main: Callable[[str], int], module: str) -> None:
    """``python -m module CONFIG.json``: the weights are local files, so the hub is never reached."""
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        print(f"usage: python -m {module} CONFIG.json  (a job writes the config; see docs/fine-tuning.md)",
              file=sys.stderr)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1]))


def total_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    return math.ceil(n_examples / batch_size) * epochs


def run_epochs(train: list[dict[str, Any]], epochs: int, batch_size: int, seed: int,
               step: Callable[[list[dict[str, Any]]], float], validation_loss: Callable[[], float | None],
               t_start: float) -> dict[str, Any]:
    """``epochs`` shuffled passes of ``step(batch) -> loss``, the validation loss after each epoch,
    a progress line after every step. Returns {steps, final_loss, val_loss, train_s}."""
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    n, t_train, val_loss, loss = 0, time.perf_counter(), None, math.nan
    emit("progress", step=0, total_steps=total, epoch=0, loss=None, val_loss=validation_loss(), eta_s=None,
         elapsed_s=round(time.perf_counter() - t_start, 1))
    for epoch in range(1, epochs + 1):
        for b in batches(train, batch_size, rng):
            loss = step(b)
            n += 1
            if n % steps_per_epoch == 0:
                val_loss = validation_loss()
            per_step = (time.perf_counter() - t_train) / n
            emit("progress", step=n, total_steps=total, epoch=epoch, loss=round(loss, 5),
                 val_loss=None if val_loss is None else round(val_loss, 5), eta_s=round(per_step * (total - n), 1),
                 elapsed_s=round(time.perf_counter() - t_start, 1))
    return {"steps": n, "final_loss": round(loss, 5), "val_loss": None if val_loss is None else round(val_loss, 5),
            "train_s": round(time.perf_counter() - t_train, 1)}
