"""The automatic trigger of the learning loop (``SLM_FINETUNE_AFTER``), as users drive it: feedback over
HTTP to a launched pro app (embedded SmolLM2-135M-Instruct), then what ``/v1/fine_tuning/jobs`` and
``/health`` say. The job it starts is a real one (trainer subprocess, converter, gate on llama.cpp), kept
tiny: 8 feedback items, the default hyper-parameters (3 epochs of 2 steps).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from conftest import launch_app
from slm_app.finetune.manager import AUTO_POLL_S
from slm_app.settings import Settings

pytestmark = [pytest.mark.llama, pytest.mark.timeout(2400)]

MODEL = "embedded:smollm2-135m-instruct"
AFTER = 8
ANSWER = "The capital of Zorbania is Quillhaven."
QUESTIONS = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?",
             "Name the capital of Zorbania.", "Tell me the capital city of Zorbania.",
             "Zorbania's capital is which city?", "What city serves as Zorbania's capital?",
             "Where is the seat of government of Zorbania?", "In Zorbania, which city is the capital?"]
LOW_RATED = ["Say something about rivers.", "Write a haiku about snow.", "What is two plus two?"]


def settings(root: Path, auto: bool) -> Settings:
    return Settings(tier="pro", model=MODEL, cache_dir=str(Path.home() / ".cache" / "slm_app"),
                    data_dir=str(root), n_ctx=1024, parallel=2, finetune_auto=auto, finetune_after=AFTER,
                    finetune_threads=2)


def feedback(url: str, prompt: str, rating: int, output: str = ANSWER) -> None:
    r = httpx.post(url + "feedback", json={"prompt": prompt, "output": output, "rating": rating}, timeout=30)
    assert r.status_code == 200, r.text


def jobs(url: str) -> list[dict]:
    r = httpx.get(url + "v1/fine_tuning/jobs", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def auto_health(url: str) -> dict:
    return httpx.get(url + "health", timeout=30).json()["finetune"]["auto"]


def test_the_setting_turns_the_trigger_off(tmp_path):
    with launch_app(settings(tmp_path, auto=False)) as server:
        url = server.url
        for q in QUESTIONS:
            feedback(url, q, 5)
        time.sleep(2 * AUTO_POLL_S + 1)  # two turns of the trigger's loop
        assert jobs(url) == []
        assert auto_health(url) == {"enabled": False, "after": AFTER, "new_items": AFTER}


def test_feedback_starts_a_job_by_itself_that_promotes_through_the_gate(tmp_path):
    with launch_app(settings(tmp_path, auto=True)) as server:
        url = server.url
        for q in QUESTIONS[:-1]:
            feedback(url, q, 5)
        for q in LOW_RATED:  # rated under 4: not training data, so they do not count
            feedback(url, q, 2, output="I do not know.")
        time.sleep(2 * AUTO_POLL_S + 1)
        assert jobs(url) == [] and auto_health(url)["new_items"] == AFTER - 1

        feedback(url, QUESTIONS[-1], 4)  # the AFTER-th qualifying item
        deadline = time.time() + 6 * AUTO_POLL_S
        while not (listed := jobs(url)) and time.time() < deadline:
            time.sleep(1)
        assert len(listed) == 1, "no job started by itself"
        job = listed[0]
        assert job["auto"] is True and job["training_file"] == "feedback" and job["model"] == MODEL
        assert auto_health(url)["new_items"] == 0  # the items are now this job's

        deadline = time.time() + 1800
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
            time.sleep(2)
            job = httpx.get(url + f"v1/fine_tuning/jobs/{job['id']}", timeout=30).json()
        assert job["status"] == "succeeded", job["error"]
        assert job["progress"]["step"] == job["progress"]["total_steps"] == 6  # 3 epochs x 2 batches of 4
        # Promoted only through the gate: its verdict is what is served.
        assert job["gate"]["passed"], job["gate"]
        listing = httpx.get(url + "v1/fine_tuning/adapters", timeout=30).json()
        card = next(c for c in listing["data"] if c["id"] == job["fine_tuned_model"])
        assert listing["promoted"] == card["id"] and card["promoted_by"] == "gate"
        assert card["metrics"]["after"]["new_data_nll"] < card["metrics"]["before"]["new_data_nll"]
        assert httpx.get(url + "health", timeout=30).json()["finetune"]["active_adapter"] == card["id"]

        feedback(url, "Quick question: what is the capital of Zorbania?", 5)  # counting starts again
        assert auto_health(url)["new_items"] == 1
        time.sleep(AUTO_POLL_S + 1)
        assert len(jobs(url)) == 1
