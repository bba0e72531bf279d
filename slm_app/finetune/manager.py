"""The learning loop of one app: uploaded files, fine-tuning jobs (one at a time), the adapters and
which one is served, the automatic trigger, and what Health shows. The OpenAI fine-tuning routes
(``slm_app.api.fine_tuning``) and the Fine-tune tab (``slm_app.ui.finetune``) both call this.

Everything lives under ``SLM_DATA_DIR/finetune/`` (files, jobs, adapters and their cards), so a
restart finds it all again, and the promoted adapter is applied again as soon as the model loads.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import logging
import os
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from slm_app.backends.base import SamplingParams
from slm_app.engines.base import Engine
from slm_app import conversation
from slm_app.evaluate import bos_token
from slm_app.feedback import store_for
from slm_app.finetune import convert, data, gate
from slm_app.finetune.adapters import AdapterRegistry, adapter_id, sha256_file
from slm_app.finetune.jobs import BASE_LEARNING_RATE, TERMINAL, Cancelled, Job, StepFailed, run_process, train, trainer_env
from slm_app.finetune.recipes import RECIPES, Recipe
from slm_app.finetune.serving import BASE, AdapterRouter
from slm_app.errors import RequestError
from slm_app.service import GenerationService

log = logging.getLogger(__name__)

FEEDBACK = "feedback"  # training_file that means the app's own feedback store
MAX_EXAMPLE_TOKENS = 512
FREE_TRAINER_MB = 850  # the TF trainer's peak RSS on tiny-gpt2, measured (docs/fine-tuning.md): over the free host
AUTO_POLL_S = 5.0
DEFAULTS = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
LIMITS = {"n_epochs": (1, 20), "batch_size": (1, 64), "learning_rate_multiplier": (1e-3, 10.0)}


class FineTuner:
    def __init__(self, service: GenerationService):
        self.service, self.settings = service, service.settings
        self.root = self.settings.data_path / "finetune"
        self.registry = AdapterRegistry(self.root / "adapters")
        self.feedback = store_for(self.settings)
        self.router: AdapterRouter | None = None
        self.attach_error: str | None = None
        self._lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._running: str | None = None
        self._jobs: dict[str, Job] = collections.OrderedDict()
        for path in sorted((self.root / "jobs").glob("*/job.json"), key=lambda p: p.stat().st_mtime):
            try:
                job = Job.load(path)
            except (OSError, ValueError, TypeError):
                continue
            if job.status not in TERMINAL:  # the process that ran it is gone
                job.finish("failed", "interrupted: the server stopped while the job ran", code="interrupted")
            self._jobs[job.id] = job
        service.load_hooks.append(self.attach)
        service.health_hooks.append(self.health)
        if service.engine is not None:
            self.attach(service.engine)
        self._auto = threading.Thread(target=self._auto_loop, name="finetune-auto", daemon=True)
        self._auto.start()

    # ---- serving adapters --------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        """Put the router in front of a backend that takes adapters, and serve the promoted one again."""
        router = engine.use_adapters(lambda scheduler: AdapterRouter(scheduler, lambda a: str(self.registry.path(a))))
        if router is None:
            return
        self.router = router
        promoted = self.registry.state().get("promoted")
        if promoted:
            try:
                self.router.preload(promoted)
                self.router.promote(promoted)
            except (KeyError, ValueError) as exc:
                self.attach_error = f"the promoted adapter {promoted} could not be loaded ({exc}); serving the base model"
                log.error(self.attach_error)

    def _router(self) -> AdapterRouter:
        self.refusal()
        assert self.router is not None
        return self.router

    def refusal(self) -> None:
        """Raise the reason this server cannot fine-tune, if there is one."""
        if self.service.tier.backend == "remote":
            raise RequestError("fine-tuning is not available with SLM_BACKEND=remote: the model's weights live "
                               "on the upstream server, so there is nothing here to train", param="model")
        engine = self.service.ready()
        if self.router is None or engine is None:
            raise RequestError(_no_adapters_reason(self.service.tier.backend), param="model")

    def adapter_ids(self) -> list[str]:
        return [c["id"] for c in self.registry.cards()] if self.router is not None else []

    def check_adapter(self, name: str) -> str:
        if self.registry.card(name) is None:
            raise RequestError(f"no adapter {name!r}; GET /v1/models lists the served model and its adapters",
                               status=404, param="model")
        return name

    def promote(self, adapter: str, by: str = "user") -> dict[str, Any]:
        """Serve ``adapter`` by default from now on (requests running finish on theirs). A file that
        does not load is refused here, and what is served stays as it was."""
        router = self._router()
        self.check_adapter(adapter)
        try:
            router.preload(adapter)
        except ValueError as exc:
            raise RequestError(f"adapter refused at load: {exc}", param="adapter") from None
        state = self.registry.set_promoted(adapter)
        self.registry.update(adapter, promoted_by=by, promoted_at=int(time.time()))
        router.promote(adapter)
        return state

    def rollback(self) -> dict[str, Any]:
        """Serve the previously promoted adapter, or the base model, from now on."""
        router = self._router()
        target = self.registry.state().get("history", [None])[-1:] or [None]
        if target[0] is not None:
            try:
                router.preload(target[0])
            except (KeyError, ValueError) as exc:
                raise RequestError(f"cannot roll back to {target[0]}: {exc}") from None
        state = self.registry.rollback()
        router.promote(state["promoted"])
        return state

    # ---- files -----------------------------------------------------------------------------------------
    def add_file(self, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise RequestError(f"purpose must be 'fine-tune' here, got {purpose!r}", param="purpose")
        if len(content) > self.settings.finetune_max_file_bytes:
            raise RequestError(f"the file is {len(content):,} bytes; at most {self.settings.finetune_max_file_bytes:,} "
                               "(SLM_FINETUNE_MAX_FILE_BYTES)", status=413, param="file")
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"the file is not UTF-8 text (byte {exc.start})", param="file") from None
        data.parse_file(text)  # malformed JSONL is refused now, with its line number
        file_id = "file-" + uuid.uuid4().hex[:24]
        folder = self.root / "files"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{file_id}.data").write_bytes(content)
        record = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed"}
        (folder / f"{file_id}.json").write_text(json.dumps(record), encoding="utf-8")
        return record

    def file(self, file_id: str) -> dict[str, Any]:
        path = self.root / "files" / f"{Path(file_id).name}.json"
        if not file_id.startswith("file-") or not path.is_file():
            raise RequestError(f"no file {file_id!r}: upload it with POST /v1/files first", status=404,
                               param="training_file")
        return json.loads(path.read_text(encoding="utf-8"))

    def _prepared(self, training_file: str, options: data.DataOptions) -> data.Prepared:
        if training_file == FEEDBACK:
            return data.from_feedback(self.feedback.all(), options, "feedback")
        record = self.file(training_file)
        text = (self.root / "files" / f"{record['id']}.data").read_text(encoding="utf-8")
        return data.from_file(text, options, record["filename"])

    # ---- jobs --------------------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        return list(reversed(self._jobs.values()))

    def job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise RequestError(f"no fine-tuning job {job_id!r}", status=404, param="fine_tuning_job_id")
        return job

    def running(self) -> Job | None:
        return self._jobs.get(self._running) if self._running else None

    def create_job(self, model: str, training_file: str, validation_file: str | None = None,
                   hyperparameters: dict[str, Any] | None = None, suffix: str | None = None,
                   seed: int | None = None, auto: bool = False) -> Job:
        """Check everything a job needs, prepare its data, and start it; refusals change nothing."""
        self.refusal()
        engine = self.service.ready()
        served = engine.info().model_id
        if model not in (served, self.service.tier.model):
            known = "" if not model.startswith("ft:") else " (fine-tune the base model, not an adapter)"
            raise RequestError(f"model {model!r} is not a base model served here{known}; fine-tuning trains "
                               f"adapters for {served!r}", status=404, param="model")
        hyper = _hyperparameters(hyperparameters or {})
        if suffix is not None and (not isinstance(suffix, str) or not 1 <= len(suffix) <= 40
                                   or not all(c.isalnum() or c in "-_" for c in suffix)):
            raise RequestError("suffix must be 1 to 40 letters, digits, '-' or '_'", param="suffix")
        _trainer_ready(_recipe(engine), self.settings.cache_dir)
        options = data.DataOptions(seed=seed or 0)
        prepared = self._prepared(training_file, options)
        if validation_file is not None:  # the user's validation data replaces the validation split
            validation = self._prepared(validation_file, data.DataOptions(ratios=(1.0, 0, 0), seed=seed or 0))
            prepared.splits["validation"] = validation.splits["train"]
            prepared.manifest["counts"]["validation"] = len(validation.splits["train"])
            prepared.manifest["validation_source"] = validation.manifest["source"]
        with self._lock:
            if (running := self.running()) is not None:
                raise RequestError(f"a fine-tuning job is already running: {running.id} ({running.status}); "
                                   "one job at a time", status=409)
            job = Job.new(served, training_file, validation_file, {**hyper, "seed": seed or 0}, suffix,
                          self.root / "jobs", auto=auto)
            job.event(f"Job created from {prepared.manifest['source']}: {prepared.manifest['counts']}")
            prepared.write(job.path / "data")
            job.save()
            self._jobs[job.id] = job
            self._running = job.id
            self._cancel[job.id] = threading.Event()
        if training_file == FEEDBACK:
            self._mark_feedback_used()
        threading.Thread(target=self._run, args=(job, prepared), name=f"finetune-{job.id}", daemon=True).start()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.job(job_id)
        if job.status in TERMINAL:
            raise RequestError(f"job {job_id} is already {job.status}", param="fine_tuning_job_id")
        self._cancel[job_id].set()
        job.event("Cancellation requested")
        return job

    def _run(self, job: Job, prepared: data.Prepared) -> None:
        cancel = self._cancel[job.id]
        times: dict[str, float] = {}
        try:
            job.status = "running"
            job.save()
            t0 = time.perf_counter()
            engine = self.service.ready()
            splits = {name: _tokenized(self.service, engine, prepared.splits[name]) for name in data.SPLITS}
            for name in ("train", "validation"):
                (job.path / f"{name}.tokens.jsonl").write_text(
                    "".join(json.dumps(e) + "\n" for e in splits[name]), encoding="utf-8")
            job.trained_tokens = sum(len(e["ids"]) for e in splits["train"]) * job.hyperparameters["n_epochs"]
            times["prepare_s"] = time.perf_counter() - t0
            recipe = _recipe(engine)
            details = engine.info().details
            base_path, base_file = recipe.base_path(details), recipe.base_file(details)
            rank, alpha = recipe.rank_alpha(details)
            t0 = time.perf_counter()
            trained = job.path / ("peft" if recipe.convert else "lora")
            config = {recipe.config_key: str(base_path), "out_dir": str(trained),
                      "train_file": str(job.path / "train.tokens.jsonl"),
                      "validation_file": str(job.path / "validation.tokens.jsonl"),
                      "epochs": job.hyperparameters["n_epochs"], "batch_size": job.hyperparameters["batch_size"],
                      "learning_rate": BASE_LEARNING_RATE * job.hyperparameters["learning_rate_multiplier"],
                      "rank": rank, "alpha": alpha, "threads": self.settings.finetune_threads,
                      "seed": job.hyperparameters["seed"]}
            result = train(job, recipe.trainer, config, self.settings.finetune_nice, cancel,
                           lambda p: self._progress(job, p))
            times["train_s"] = time.perf_counter() - t0
            adapter_file = job.path / recipe.adapter_file
            if recipe.convert:
                t0 = time.perf_counter()
                job.event("Converting the LoRA to a GGUF adapter (llama.cpp's convert_lora_to_gguf.py)")
                cmd, env = convert.convert_command(Path(self.settings.cache_dir), trained, adapter_file)
                run_process(cmd, {**env, **trainer_env(self.settings.finetune_threads)}, self.settings.finetune_nice,
                            cancel, lambda line: None, job.path / "convert.log")
                times["convert_s"] = time.perf_counter() - t0
            else:
                os.replace(trained / recipe.adapter_file, adapter_file)
            name = adapter_id(job.model, job.suffix, job.id)
            card = {"id": name, "job_id": job.id, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "status": "candidate", "base_model": job.model, "base_file": base_file.name,
                    "base_sha256": sha256_file(base_file), "data_manifest": prepared.manifest,
                    "random_weights": engine.info().random_weights,
                    "hyperparameters": {**job.hyperparameters, **{k: config[k] for k in
                                                                  ("learning_rate", "rank", "alpha", "threads")}},
                    "trainer": {k: result.get(k) for k in ("versions", "final_loss", "val_loss", "steps",
                                                           "trainable_parameters", "peak_rss_mb", "load_s", "train_s")},
                    "times": {k: round(v, 1) for k, v in times.items()}}
            self.registry.add(job.id, adapter_file, card)
            job.fine_tuned_model = name
            job.save()
            self._gate(job, name, splits, prepared, cancel, times)
            job.finish("succeeded")
        except Cancelled:
            job.finish("cancelled")
        except InterruptedError:
            job.finish("cancelled")
        except (StepFailed, RequestError, ValueError, KeyError, OSError) as exc:
            job.finish("failed", str(getattr(exc, "message", exc)))
        except Exception as exc:  # a bug: the job fails, the server serves on
            log.exception("fine-tuning job %s failed", job.id)
            job.finish("failed", f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._running = None

    def _progress(self, job: Job, record: dict[str, Any]) -> None:
        job.progress = record
        if record.get("step"):
            job.losses.append({"step": record["step"], "loss": record.get("loss"), "val_loss": record.get("val_loss")})
            if record["step"] == record.get("total_steps") or record["step"] % 5 == 0:
                job.event(f"Step {record['step']}/{record['total_steps']}: training loss={record.get('loss')}",
                          data={k: record.get(k) for k in ("step", "total_steps", "loss", "val_loss", "eta_s")})
        job.save()

    def _gate(self, job: Job, name: str, splits: dict[str, list], prepared: data.Prepared,
              cancel: threading.Event, times: dict[str, float]) -> None:
        t0 = time.perf_counter()
        router = self._router()
        try:
            router.preload(name)
        except ValueError as exc:
            self.registry.update(name, status="refused", gate={"passed": False, "reasons": [f"load: {exc}"]})
            raise StepFailed(f"the converted adapter does not load: {exc}") from None
        held_out = next((s for s in ("test", "validation") if splits[s]), "train")
        job.event(f"Evaluation gate on the {held_out} split: candidate {name} vs {router.promoted or BASE}")
        job.save()
        before = gate.measure(self.service, router, router.promoted, splits[held_out], prepared.splits[held_out],
                              cancel.is_set)
        after = gate.measure(self.service, router, name, splits[held_out], prepared.splits[held_out], cancel.is_set)
        passed, reasons = gate.decide(before, after, self.settings.finetune_max_regression,
                                      self.settings.finetune_min_improvement)
        times["gate_s"] = time.perf_counter() - t0
        verdict = {"passed": passed, "reasons": reasons, "held_out_split": held_out,
                   "compared_with": router.promoted or BASE, "max_regression": self.settings.finetune_max_regression}
        job.gate = verdict
        self.registry.update(name, gate=verdict, metrics={"before": before, "after": after},
                             times={k: round(v, 1) for k, v in times.items()},
                             status="candidate" if passed else "refused")
        job.event(("Gate passed: " if passed else "Gate refused the candidate: ") + "; ".join(reasons),
                  level="info" if passed else "warn", data={"before": before["new_data_nll"],
                                                            "after": after["new_data_nll"]})
        if passed:
            self.promote(name, by="gate")
            job.event(f"Promoted {name}: served by default from now on")

    # ---- automatic trigger ------------------------------------------------------------------------
    def _auto_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / "auto.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"feedback_id": 0}

    def _mark_feedback_used(self) -> None:
        rows = self.feedback.all()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "auto.json").write_text(json.dumps({"feedback_id": rows[-1]["id"] if rows else 0}))

    def new_feedback(self) -> int:
        """Qualifying feedback (rated >= 4) sent since the last job trained on the feedback store."""
        since = self._auto_state()["feedback_id"]
        return sum(1 for r in self.feedback.all() if r["id"] > since and r["rating"] >= data.MIN_RATING)

    def _auto_loop(self) -> None:
        while self.service.status != "closed":  # the app is gone: so is its trigger
            time.sleep(AUTO_POLL_S)
            if not self.settings.finetune_auto or self.router is None or self.running() is not None:
                continue
            try:
                if self.feedback.path.exists() and self.new_feedback() >= self.settings.finetune_after:
                    self.create_job(self.service.ready().info().model_id, FEEDBACK, auto=True)
            except RequestError as exc:
                log.warning("automatic fine-tuning not started: %s", exc.message)
                self._mark_feedback_used()  # do not retry the same data every few seconds
            except Exception:  # never let the trigger die
                log.exception("automatic fine-tuning trigger failed")

    # ---- health ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        running = self.running()
        promoted = self.router.promoted if self.router is not None else None
        card = self.registry.card(promoted) if promoted else None
        return {"finetune": {
            "available": self.router is not None,
            "active_adapter": promoted or BASE,
            "active_adapter_metrics": (card or {}).get("metrics", {}).get("after"),
            "router": self.router.status() if self.router is not None else None,
            "running_job": running.public() | {"losses": None} if running else None,
            "adapters": len(self.registry.cards()),
            "auto": {"enabled": self.settings.finetune_auto, "after": self.settings.finetune_after,
                     "new_items": self.new_feedback() if self.feedback.path.exists() else 0},
            "error": self.attach_error,
        }}


def _hyperparameters(given: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise RequestError("hyperparameters must be an object", param="hyperparameters")
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise RequestError(f"unknown hyperparameter {sorted(unknown)[0]!r}; use {', '.join(DEFAULTS)}",
                           param="hyperparameters")
    out = {}
    for key, default in DEFAULTS.items():
        value = given.get(key, "auto")
        if value in ("auto", None):
            out[key] = default
            continue
        lo, hi = LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi or \
                (isinstance(default, int) and value != int(value)):
            raise RequestError(f"hyperparameters.{key} must be 'auto' or a number from {lo} to {hi}, got {value!r}",
                               param=f"hyperparameters.{key}")
        out[key] = type(default)(value)
    return out


def _recipe(engine: Engine) -> Recipe:
    return RECIPES[engine.backend.adapter_kind]  # type: ignore[attr-defined]


def _no_adapters_reason(backend: str) -> str:
    if backend == "litert":
        return ("fine-tuning is not available on the free tier: it serves a LiteRT model without TensorFlow "
                f"to fit a 512 MB host, and a TensorFlow LoRA trainer needs ~{FREE_TRAINER_MB} MB more; the "
                "standard tier (TensorFlow GPT-2) and the pro tier (llama.cpp) fine-tune")
    if backend == "tensorflow":
        return "fine-tuning is off: SLM_TF_LORA_RANK=0 compiles the TensorFlow model without LoRA factors"
    return f"fine-tuning needs a backend that serves LoRA adapters (tensorflow or llama.cpp); this server runs {backend}"


def _trainer_ready(recipe: Recipe, cache_dir: str) -> None:
    missing = [m for m in recipe.packages if importlib.util.find_spec(m) is None]
    if missing:
        raise RequestError(f"the trainer's packages are not installed ({', '.join(missing)}): run "
                           "./setup.sh --finetune", status=503)
    if not recipe.convert:
        return
    try:
        convert.converter_script(Path(cache_dir))
    except convert.ConverterMissing as exc:
        raise RequestError(str(exc), status=503) from None


def _tokenized(service: GenerationService, engine: Engine, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training examples in the served model's own tokens: {"ids", "start"} (the loss from ``start``)."""
    backend = engine.backend  # type: ignore[attr-defined]
    end = backend.end_of_turn_token()
    bos = bos_token(engine)
    out = []
    for item in items:
        if "text" in item:  # learnt as a whole: the loss from the first token that has a predecessor
            prompt_ids, answer = [bos] if bos is not None else [], item["text"]
        else:
            rendered = conversation.render(service, item["messages"][:-1])
            prompt_ids = engine.tokenize(rendered.prompt.text)
            answer = item["messages"][-1]["content"]
            answer = answer if rendered.templated else " " + answer  # a transcript's "Assistant:" wants a space
        answer_ids = engine.tokenize(answer)
        if bos is not None and answer_ids[:1] == [bos]:
            answer_ids = answer_ids[1:]
        ids = prompt_ids + answer_ids + ([end] if end is not None else [])
        if len(ids) > MAX_EXAMPLE_TOKENS or len(ids) < 2:
            continue
        out.append({"ids": ids, "start": max(len(prompt_ids), 1)})
    return out


def adapter_ids(service: GenerationService) -> list[str]:
    """The adapters ``model`` may name (for GET /v1/models)."""
    return tuner_for(service).adapter_ids()


def with_adapter(service: GenerationService, params: SamplingParams, model: str) -> SamplingParams:
    """``params`` for a request that named ``model``: an adapter's id selects it, the base model's id
    gets what is promoted."""
    return dataclasses.replace(params, adapter=model) if model in adapter_ids(service) else params


_TUNERS: "weakref.WeakKeyDictionary[GenerationService, FineTuner]" = weakref.WeakKeyDictionary()
_TUNERS_LOCK = threading.Lock()


def tuner_for(service: GenerationService) -> FineTuner:
    """The app's one ``FineTuner`` (shared by the routes and the Fine-tune tab)."""
    with _TUNERS_LOCK:
        if service not in _TUNERS:
            _TUNERS[service] = FineTuner(service)
        return _TUNERS[service]
