#!/usr/bin/env bash
# Free tier only: create or refresh .venv/ with the pinned requirements and build the offline
# tiny-gpt2. No llama.cpp compile. Idempotent; safe to run again.
#   ./setup_lightweight.sh            the app
#   ./setup_lightweight.sh --tests    the app and the test tools
set -euo pipefail
cd "$(dirname "$0")"
SLM_SETUP_PRO=0 exec ./setup.sh "$@"
