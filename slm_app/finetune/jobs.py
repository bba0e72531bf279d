"""A fine-tuning job: its record (OpenAI's ``fine_tuning.job`` shape, kept on disk), the processes it
runs (at low priority, cancellable) and its pipeline: tokenize → train → (convert) → gate → promote.

The trainers (torch, or TensorFlow) and the converter each run as their own process: ``nice`` (Linux
scheduling priority ``SLM_FINETUNE_NICE``) and ``SLM_FINETUNE_THREADS`` threads, in a new session so
a cancel ends it and anything it started. The trainer reports progress as JSON lines on stdout;
each becomes the job's ``progress`` (step, loss, validation loss, ETA), a point of its loss curve
and, every few steps, an event.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
BASE_LEARNING_RATE = 1e-3  # learning_rate_multiplier 1: LoRA on a 135M model learns a fact in a few epochs
STDERR_TAIL = 2_000


class Cancelled(Exception):
    """The job was cancelled while this step ran."""


class StepFailed(Exception):
    """A step of the pipeline failed; the message is the job's error."""


@dataclass
class Job:
    id: str
    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    suffix: str | None
    directory: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "validating_files"
    finished_at: int | None = None
    fine_tuned_model: str | None = None
    error: dict[str, Any] | None = None
    trained_tokens: int | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    losses: list[dict[str, Any]] = field(default_factory=list)  # {step, loss, val_loss}
    events: list[dict[str, Any]] = field(default_factory=list)
    gate: dict[str, Any] | None = None
    auto: bool = False  # started by SLM_FINETUNE_AFTER, not by a user

    @staticmethod
    def new(model: str, training_file: str, validation_file: str | None, hyperparameters: dict[str, Any],
            suffix: str | None, root: Path, auto: bool = False) -> "Job":
        job_id = "ftjob-" + uuid.uuid4().hex[:12]
        return Job(job_id, model, training_file, validation_file, hyperparameters, suffix, str(root / job_id),
                   auto=auto)

    @property
    def path(self) -> Path:
        return Path(self.directory)

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / ".job.json.tmp"
        tmp.write_text(json.dumps(asdict(self), default=str), encoding="utf-8")
        os.replace(tmp, self.path / "job.json")

    @staticmethod
    def load(path: Path) -> "Job":
        return Job(**json.loads(path.read_text(encoding="utf-8")))

    def event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.events.append({"id": f"ftevent-{uuid.uuid4().hex[:12]}", "object": "fine_tuning.job.event",
                            "created_at": int(time.time()), "level": level, "message": message,
                            "type": "metrics" if data else "message", "data": data or {}})
        log.info("%s: %s", self.id, message)

    def finish(self, status: str, error: str | None = None, code: str | None = None) -> None:
        self.status, self.finished_at = status, int(time.time())
        if error:
            self.error = {"code": code or "job_failed", "message": error, "param": None}
            self.event(error, level="error")
        self.save()

    def public(self) -> dict[str, Any]:
        """OpenAI's ``fine_tuning.job`` object, plus this server's ``progress``, ``losses`` and ``gate``."""
        return {"id": self.id, "object": "fine_tuning.job", "created_at": self.created_at,
                "finished_at": self.finished_at, "model": self.model, "fine_tuned_model": self.fine_tuned_model,
                "organization_id": "slm-space", "status": self.status, "hyperparameters": self.hyperparameters,
                "training_file": self.training_file, "validation_file": self.validation_file,
                "result_files": [], "trained_tokens": self.trained_tokens, "error": self.error,
                "seed": self.hyperparameters.get("seed", 0), "suffix": self.suffix,
                "estimated_finish": (int(time.time() + self.progress["eta_s"])
                                     if self.status == "running" and self.progress.get("eta_s") is not None else None),
                "integrations": [], "progress": self.progress, "losses": self.losses, "gate": self.gate,
                "auto": self.auto}


def run_process(cmd: list[str], env: dict[str, str], nice: int, cancel: threading.Event,
                on_line: Callable[[str], None], log_file: Path) -> None:
    """Run ``cmd`` at low priority; each stdout line goes to ``on_line``, stderr to ``log_file``.
    Raises ``Cancelled`` (after ending the whole process group) or ``StepFailed`` (exit status and the
    end of stderr)."""
    with log_file.open("ab") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True,
                                preexec_fn=lambda: _child_setup(nice), text=True, bufsize=1)
        watcher = threading.Thread(target=_kill_on_cancel, args=(proc, cancel), daemon=True, name="ft-cancel")
        watcher.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                on_line(line)
        rc = proc.wait()
    if cancel.is_set():
        raise Cancelled()
    if rc != 0:
        tail = log_file.read_bytes()[-STDERR_TAIL:].decode("utf-8", "replace").strip().splitlines()
        raise StepFailed(f"{Path(cmd[2] if cmd[1] == '-m' else cmd[1]).name} exited with status {rc}: "
                         f"{tail[-1] if tail else 'no output'}")


def _child_setup(nice: int) -> None:
    """In the child, before exec: lower its priority, and (Linux) have it sent SIGTERM if the server
    dies, so a trainer never outlives the app that started it."""
    if nice:
        os.nice(nice)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _kill_on_cancel(proc: subprocess.Popen, cancel: threading.Event) -> None:
    while proc.poll() is None:
        if cancel.wait(0.2):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return


def trainer_env(threads: int) -> dict[str, str]:
    # USE_TF=0: transformers would import TensorFlow (installed for the TF tiers) beside torch otherwise.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "USE_TF": "0", "USE_FLAX": "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def train(job: Job, trainer: str, config: dict[str, Any], nice: int, cancel: threading.Event,
          on_progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the trainer module (``slm_app.finetune.train_llama`` or ``train_tf``) on ``config``; returns
    its final ``done`` record."""
    config_path = job.path / "train_config.json"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    result: dict[str, Any] = {}
    errors: list[str] = []

    def on_line(line: str) -> None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return  # a library printing to stdout
        kind = record.pop("event", None)
        if kind == "progress":
            on_progress(record)
        elif kind == "status":
            job.event(record.get("message", ""))
            job.save()
        elif kind == "error":
            errors.append(record.get("message", "the trainer failed"))
        elif kind == "done":
            result.update(record)

    try:
        run_process([sys.executable, "-m", trainer, str(config_path)],
                    trainer_env(int(config["threads"])), nice, cancel, on_line, job.path / "trainer.log")
    except StepFailed as exc:
        raise StepFailed(errors[0] if errors else str(exc)) from None
    if not result:
        raise StepFailed(errors[0] if errors else "the trainer ended without a result")
    return result
