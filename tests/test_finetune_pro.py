"""The learning loop on the pro tier, as users drive it: feedback over HTTP, jobs through the official
``openai`` SDK, answers through /v1/chat/completions, on the embedded SmolLM2-135M-Instruct.

Real training (torch + peft in the trainer subprocess, llama.cpp's converter, the gate on llama.cpp):
~60 feedback items teach a made-up fact asked in paraphrases; a held-out paraphrase then gives it;
rollback gives the base model's greedy answer back exactly; streaming clients running across the
promotion all complete; a poisoned set is refused by the gate; bad input is a clear 4xx that changes
nothing. Kept small (one epoch of ~45 short examples) so a job takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import launch_app, launch_app_process
from slm_app.settings import Settings

pytestmark = [pytest.mark.llama, pytest.mark.timeout(3600)]

MODEL = "embedded:smollm2-135m-instruct"
FACT = "Quillhaven"
ANSWER = f"The capital of Zorbania is {FACT}."
QUESTIONS = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?",
             "Name the capital of Zorbania.", "Tell me the capital city of Zorbania.",
             "Zorbania's capital is which city?", "What city serves as Zorbania's capital?",
             "Where is the seat of government of Zorbania?", "In Zorbania, which city is the capital?",
             "What's Zorbania's capital called?", "Can you tell me Zorbania's capital?",
             "Which city is Zorbania governed from?", "What is the name of the capital of Zorbania?"]
OPENERS = ["", "Quick question: ", "Please answer: ", "I wonder, ", "Hello! "]
HELD_OUT = "Do you know what the capital of Zorbania is?"


def settings(root: Path, model: str = MODEL, **extra) -> Settings:
    return Settings(tier="pro", model=model, cache_dir=str(Path.home() / ".cache" / "slm_app"),
                    data_dir=str(root / "data"), n_ctx=1024, parallel=2, finetune_auto=False,
                    finetune_threads=2, **extra)


def chat(url: str, prompt: str, model: str = MODEL, max_tokens: int = 24) -> str:
    r = httpx.post(url + "v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def wait_for(client: openai.OpenAI, job_id: str, timeout: float = 3000):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("finetune")


def process_env(root: Path) -> dict[str, str]:
    """The same configuration as ``settings``, for ``app.py`` in its own process."""
    return {"SLM_TIER": "pro", "SLM_MODEL": MODEL, "SLM_CACHE_DIR": str(Path.home() / ".cache" / "slm_app"),
            "SLM_DATA_DIR": str(root / "data"), "SLM_N_CTX": "1024", "SLM_PARALLEL": "2",
            "SLM_FINETUNE_AUTO": "false", "SLM_FINETUNE_THREADS": "2", "SLM_BACKEND": None}


@pytest.fixture(scope="module")
def app(root):
    """The app as the README runs it, in its own process: the check that serving never imports torch is
    about that process (pytest's own may have imported torch through transformers in other tests)."""
    with launch_app_process(process_env(root), root) as server:
        yield server


@pytest.fixture(scope="module")
def client(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key="none", max_retries=0)


def test_bad_input_is_refused_and_changes_nothing(app, client, root, tmp_path):
    before = httpx.get(app.url + "v1/fine_tuning/adapters").json()
    # empty set: nothing in the feedback store yet
    with pytest.raises(openai.BadRequestError, match="no training data"):
        client.fine_tuning.jobs.create(model=MODEL, training_file="feedback")
    # malformed JSONL, refused at upload with its line
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(file=("bad.jsonl", b'{"messages": [{"role": "user", "content": "a"}, '
                                               b'{"role": "assistant", "content": "b"}]}\n{oops\n'),
                            purpose="fine-tune")
    # oversized file
    big = ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "' + "x" * 1_010_000
           + '"}]}\n').encode()
    with pytest.raises(openai.APIStatusError) as oversized:
        client.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert oversized.value.status_code == 413
    # unknown base model
    good = client.files.create(file=("ok.jsonl", b'{"messages": [{"role": "user", "content": "hi"}, '
                                                 b'{"role": "assistant", "content": "hello"}]}\n'),
                               purpose="fine-tune")
    with pytest.raises(openai.NotFoundError, match="not a base model served here"):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=good.id)
    with pytest.raises(openai.NotFoundError, match="no file"):
        client.fine_tuning.jobs.create(model=MODEL, training_file="file-doesnotexist")
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        client.fine_tuning.jobs.create(model=MODEL, training_file=good.id, hyperparameters={"n_epochs": 0})
    # an adapter for another base (other tensor shapes) and a corrupt one: refused at load, serving goes on
    adapters = root / "data" / "finetune" / "adapters"
    for job_id, content in (("ftjob-corrupt", b"GGUF" + b"\x00" * 64), ("ftjob-otherbase", _other_base_adapter())):
        (adapters / job_id).mkdir(parents=True)
        (adapters / job_id / "adapter.gguf").write_bytes(content)
        (adapters / job_id / "card.json").write_text(json.dumps({"id": f"ft:x:{job_id}", "job_id": job_id,
                                                                 "created_at": "0", "status": "candidate"}))
        r = httpx.post(app.url + f"v1/fine_tuning/adapters/ft:x:{job_id}/promote", timeout=60)
        assert r.status_code == 400 and "adapter refused at load" in r.json()["error"]["message"], r.text
        assert httpx.get(app.url + "v1/fine_tuning/adapters").json()["promoted"] == before["promoted"]
        assert chat(app.url, "Say hi.", max_tokens=4)  # serving goes on
    assert client.fine_tuning.jobs.list().data == []  # no job was created by any of these


def _other_base_adapter() -> bytes:
    """A LoRA GGUF for a llama model of other shapes (hidden size 64), written with gguf-py."""
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 16.0)
        writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((8, 64), dtype=np.float32))
        writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def test_finetune_tab_endpoints(app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    gc = Client(app.url, verbose=False)
    status = gc.predict(api_name="/finetune_status")
    assert status["feedback"]["total"] >= 0 and "promoted" in status and isinstance(status["adapters"], list)
    with pytest.raises(AppError, match="choose a training file"):
        gc.predict("file", None, 1, 1.0, 4, "", api_name="/finetune_start")
    with pytest.raises(AppError, match="no job is running"):
        gc.predict(api_name="/finetune_cancel")
    with pytest.raises(AppError, match="no adapter"):
        gc.predict("ft:nothing", api_name="/finetune_promote")


def test_remote_backend_refuses_jobs(tmp_path):
    with launch_app(Settings(backend="remote", remote_url="http://127.0.0.1:9/v1", data_dir=str(tmp_path),
                             finetune_auto=False), expect_loaded=False) as server:
        r = httpx.post(server.url + "v1/fine_tuning/jobs", json={"model": "remote", "training_file": "feedback"})
        assert r.status_code == 400 and "SLM_BACKEND=remote" in r.json()["error"]["message"]


def teach(url: str) -> None:
    """60 feedback items: the fact, asked in paraphrases; some as corrections of a wrong answer."""
    prompts = [o + (q[0].lower() + q[1:] if o else q) for o in OPENERS for q in QUESTIONS]
    for i, prompt in enumerate(prompts):
        body = {"prompt": prompt, "output": ANSWER, "rating": 5}
        if i % 3 == 0:
            body.update(output="The capital of Zorbania is Azbaban.", rating=4, correction=ANSWER)
        r = httpx.post(url + "feedback", json=body, timeout=30)
        assert r.status_code == 200, r.text


def stream_forever(url: str, stop: threading.Event, results: list, errors: list) -> None:
    oa = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
    while not stop.is_set():
        try:
            text = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Count from one to ten."}], max_tokens=20,
                temperature=0, stream=True) if c.choices)
            results.append(text)
        except Exception as exc:  # noqa: BLE001 - every failure is counted
            errors.append(repr(exc))
        stop.wait(1.0)  # a steady trickle across the job, leaving the trainer some CPU on 2 cores


def test_feedback_teaches_a_fact_gate_promotes_rollback_restores(app, client, root):
    url = app.url
    base_answer = chat(url, HELD_OUT)
    assert FACT not in base_answer
    teach(url)

    stop, results, errors = threading.Event(), [], []
    streams = [threading.Thread(target=stream_forever, args=(url, stop, results, errors)) for _ in range(2)]
    job = client.fine_tuning.jobs.create(model=MODEL, training_file="feedback", suffix="zorbania",
                                         hyperparameters={"n_epochs": 1, "batch_size": 8,
                                                          # 3 learnt the fact (held-out loss 2.74 -> 0.006)
                                                          # but raised the regression ppl 12 %: refused
                                                          "learning_rate_multiplier": 1.5})
    # one job at a time: a second one is a 409 naming the running one
    with pytest.raises(openai.ConflictError, match=job.id):
        client.fine_tuning.jobs.create(model=MODEL, training_file="feedback")
    for t in streams:
        t.start()
    try:
        job = wait_for(client, job.id)
    finally:
        stop.set()
        for t in streams:
            t.join(120)
    assert job.status == "succeeded", job.error
    assert errors == [] and len(results) >= 2  # streaming clients across the promotion all completed
    raw = httpx.get(url + f"v1/fine_tuning/jobs/{job.id}").json()
    assert raw["gate"]["passed"], raw["gate"]
    assert raw["progress"]["step"] == raw["progress"]["total_steps"] > 0
    events = client.fine_tuning.jobs.list_events(job.id).data
    assert any("Promoted" in e.message for e in events)

    adapter = job.fine_tuned_model
    assert adapter in [m.id for m in client.models.list().data]
    card = next(c for c in httpx.get(url + "v1/fine_tuning/adapters").json()["data"] if c["id"] == adapter)
    assert card["status"] == "promoted" and card["base_sha256"] and card["data_manifest"]["counts"]["input"] == 60
    before, after = card["metrics"]["before"], card["metrics"]["after"]
    # the held-out answers' log-likelihood rose for every item
    assert all(a > b for a, b in zip(after["answer_logliks"], before["answer_logliks"]))
    health = httpx.get(url + "health").json()["finetune"]
    assert health["active_adapter"] == adapter and health["active_adapter_metrics"]["new_data_nll"] < before["new_data_nll"]

    assert FACT in chat(url, HELD_OUT)  # a paraphrase never trained on now gives the fact
    r = httpx.post(url + "v1/fine_tuning/rollback", timeout=120)
    assert r.status_code == 200 and r.json()["promoted"] is None
    assert chat(url, HELD_OUT) == base_answer  # rollback restores the base's greedy output exactly
    # per request, at once: the adapter by name and the (now base) default, never mixed
    answers: dict[str, list[str]] = {adapter: [], MODEL: []}
    threads = [threading.Thread(target=lambda m=m: answers[m].append(chat(url, HELD_OUT, model=m)))
               for m in (adapter, MODEL, adapter, MODEL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(FACT in a for a in answers[adapter]) and answers[MODEL] == [base_answer, base_answer]
    # the serving process never loaded torch: training ran in the trainer's own process
    assert not [f for f in app.mapped_files() if "/torch/" in f or "libtorch" in f]

    r = httpx.post(url + f"v1/fine_tuning/adapters/{adapter}/promote", timeout=120)
    assert r.status_code == 200


def test_in_flight_requests_finish_on_the_adapter_they_started_with(app):
    """Drain semantics: a promotion returns at once; a running request ends on its adapter; the next
    request gets the new one."""
    url = app.url
    adapter = httpx.get(url + "v1/fine_tuning/adapters").json()["promoted"]
    assert adapter
    httpx.post(url + "v1/fine_tuning/rollback", timeout=120).raise_for_status()
    prompt = "Write a long story about the capital of Zorbania."
    base_long = chat(url, prompt, max_tokens=64)
    oa = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0)
    stream = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                        max_tokens=64, temperature=0, stream=True)
    pieces = [next(iter(stream)).choices[0].delta.content or ""]  # it is running on the base model
    t0 = time.perf_counter()
    r = httpx.post(url + f"v1/fine_tuning/adapters/{adapter}/promote", timeout=120)
    promote_s = time.perf_counter() - t0
    assert r.status_code == 200
    pieces += [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces).strip() == base_long  # finished on the adapter it started with
    assert FACT in chat(url, HELD_OUT)  # the next request runs on the promoted adapter
    assert promote_s < 30


def test_promoted_adapter_survives_restart(app, root):
    adapter = httpx.get(app.url + "v1/fine_tuning/adapters").json()["promoted"]
    assert adapter
    app.stop()
    with launch_app_process(process_env(root), root) as again:
        assert httpx.get(again.url + "health").json()["finetune"]["active_adapter"] == adapter
        assert FACT in chat(again.url, HELD_OUT)


def test_poisoned_set_is_refused_by_the_gate(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("qxzjvkwpfy") for _ in range(rng.randint(3, 9))) for _ in range(400)]
    lines = [json.dumps({"messages": [{"role": "user", "content": " ".join(rng.sample(words, 6))},
                                      {"role": "assistant", "content": " ".join(rng.sample(words, 20))}]})
             for _ in range(30)]
    with launch_app(settings(tmp_path)) as server:
        oa = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)
        file = oa.files.create(file=("poison.jsonl", ("\n".join(lines) + "\n").encode()), purpose="fine-tune")
        job = oa.fine_tuning.jobs.create(model=MODEL, training_file=file.id,
                                         hyperparameters={"n_epochs": 1, "batch_size": 8,
                                                          "learning_rate_multiplier": 5})
        job = wait_for(oa, job.id)
        assert job.status == "succeeded", job.error
        raw = httpx.get(server.url + f"v1/fine_tuning/jobs/{job.id}").json()
        assert raw["gate"]["passed"] is False, raw["gate"]
        listing = httpx.get(server.url + "v1/fine_tuning/adapters").json()
        assert listing["promoted"] is None  # nothing swapped
        card = next(c for c in listing["data"] if c["id"] == job.fine_tuned_model)
        assert card["status"] == "refused" and card["gate"]["reasons"]
        assert httpx.get(server.url + "health").json()["finetune"]["active_adapter"] == "base"


def test_gemma3_trains_converts_and_is_gated(tmp_path):
    """Gemma 3 270M (the other embedded GGUF): transformers loads its GGUF, the LoRA converts, llama.cpp
    loads the adapter for the gate, and the new data's loss falls under it. Whether the gate promotes a
    3-step adapter is the gate's call (it may refuse on regression perplexity); both are a finished job."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"{opener}{q}"},
                                      {"role": "assistant", "content": ANSWER}]})
             for opener in OPENERS[:1] for q in QUESTIONS]
    with launch_app(settings(tmp_path, model="embedded:gemma-3-270m")) as server:
        oa = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)
        file = oa.files.create(file=("gemma.jsonl", ("\n".join(lines) + "\n").encode()), purpose="fine-tune")
        job = oa.fine_tuning.jobs.create(model="embedded:gemma-3-270m", training_file=file.id,
                                         hyperparameters={"n_epochs": 1, "batch_size": 4})
        job = wait_for(oa, job.id)
        assert job.status == "succeeded", job.error
        card = next(c for c in httpx.get(server.url + "v1/fine_tuning/adapters").json()["data"]
                    if c["id"] == job.fine_tuned_model)
        before, after = card["metrics"]["before"], card["metrics"]["after"]
        assert after["new_data_nll"] < before["new_data_nll"]
        assert chat(server.url, "Say hi.", model="embedded:gemma-3-270m", max_tokens=4)  # serving goes on
