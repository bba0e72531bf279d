"""Model resolution runs the real huggingface_hub code against a local folder served as the hub.

Each resolution runs in a subprocess because huggingface_hub reads HF_ENDPOINT / HF_HOME at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import FakeHub

RESOLVE = """
import json, sys
from pathlib import Path
from slm_app.provisioning.hub import resolve_gguf, resolve_hf_model
kind, spec, fallback = sys.argv[1:4]
fb = (lambda: Path(fallback)) if fallback != "-" else None
r = (resolve_hf_model if kind == "hf" else resolve_gguf)(spec, fallback=fb, fallback_label="fallback")
print(json.dumps({"name": r.name, "path": str(r.path) if r.path else None, "source": r.source, "reason": r.reason}))
"""


def resolve(tmp: Path, endpoint: str, kind: str, spec: str, fallback: str = "-", offline: bool = False) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", RESOLVE, kind, spec, fallback], env=env, capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture()
def hub_folder(tmp_path: Path) -> Path:
    repo = tmp_path / "hub" / "acme" / "tiny-gpt2"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"model_type": "gpt2"}')
    (repo / "tf_model.h5").write_bytes(b"weights" * 100)
    (repo / "pytorch_model.bin").write_bytes(b"not wanted")  # filtered out by TF_MODEL_FILES
    gguf = tmp_path / "hub" / "acme" / "tiny-GGUF"
    gguf.mkdir(parents=True)
    (gguf / "tiny-q4.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    return tmp_path / "hub"


def test_hub_download_then_cache(tmp_path: Path, hub_folder: Path) -> None:
    with FakeHub(hub_folder) as hub:
        first = resolve(tmp_path, hub.url, "hf", "acme/tiny-gpt2")
        assert first["source"] == "hub", first
        files = sorted(p.name for p in Path(first["path"]).iterdir())
        assert files == ["config.json", "tf_model.h5"]
        assert (Path(first["path"]) / "tf_model.h5").read_bytes() == b"weights" * 100
        assert any("resolve" in r for r in hub.requests)
    # The hub is gone now: the same model comes from huggingface_hub's cache.
    second = resolve(tmp_path, hub.url, "hf", "acme/tiny-gpt2")
    assert second["source"] == "hub-cache" and second["path"] == first["path"]


def test_gguf_repo_and_filename(tmp_path: Path, hub_folder: Path) -> None:
    with FakeHub(hub_folder) as hub:
        r = resolve(tmp_path, hub.url, "gguf", "acme/tiny-GGUF:tiny-q4.gguf")
    assert r["source"] == "hub" and Path(r["path"]).read_bytes().startswith(b"GGUF")


def test_unreachable_hub_uses_fallback_quickly(tmp_path: Path) -> None:
    fallback = tmp_path / "fallback-model"
    fallback.mkdir()
    # A port nobody listens on: the reachability probe fails at once instead of ~20 s of retries.
    r = resolve(tmp_path, "http://127.0.0.1:9", "hf", "acme/missing", str(fallback))
    assert r["source"] == "offline-fallback" and r["path"] == str(fallback)
    assert "unreachable" in r["reason"]


def test_offline_without_fallback_reports_why(tmp_path: Path) -> None:
    r = resolve(tmp_path, "http://127.0.0.1:9", "gguf", "acme/missing-GGUF:x.gguf", offline=True)
    assert r["source"] == "missing" and r["path"] is None
    assert "HF_HUB_OFFLINE" in r["reason"]


def test_local_paths(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert resolve(tmp_path, "http://127.0.0.1:9", "hf", str(model_dir))["source"] == "local"
    missing = resolve(tmp_path, "http://127.0.0.1:9", "gguf", str(tmp_path / "nope.gguf"), str(model_dir))
    # An explicit local file that does not exist is an error, never silently replaced.
    assert missing["source"] == "missing" and "does not exist" in missing["reason"]


def test_repo_file_spec_parsing() -> None:
    from slm_app.provisioning.hub import parse_gguf_spec

    assert parse_gguf_spec("Qwen/Qwen2.5-3B-Instruct-GGUF:qwen2.5-3b-instruct-q4_k_m.gguf") == (
        "Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-q4_k_m.gguf")
    assert parse_gguf_spec("/models/x.gguf") is None
    assert parse_gguf_spec("a/b/c:x.gguf") is None
