#!/usr/bin/env bash
# Free tier only, for small hosts (a 512 MB Render/Docker/Spaces instance): create or refresh .venv/
# with what the free tier serves with (requirements-free.txt: LiteRT, no TensorFlow), then convert
# tiny-gpt2 to LiteRT. The conversion needs TensorFlow, so it runs in a throwaway build venv (which
# sees .venv's packages and adds only TensorFlow) that is deleted afterwards: nothing of TensorFlow
# stays installed or in the serving process. Idempotent; a second run only checks.
#   ./setup_lightweight.sh        then run the app with  SLM_TIER=free .venv/bin/python app.py
# (The test suite covers every tier: use ./setup.sh --tests for it.)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
for arg in "$@"; do
  echo "setup_lightweight: unknown option $arg (the test suite needs ./setup.sh --tests)" >&2; exit 2
done
step() { printf '\n==> %s\n' "$*"; }
trap 'echo "setup_lightweight: FAILED at line $LINENO (see the output above)" >&2' ERR

step "virtualenv .venv (with $($PYTHON --version))"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet "pip==26.3"

step "the free tier's pinned requirements (requirements-free.txt: LiteRT, no TensorFlow)"
"${PIP[@]}" install --quiet -r requirements-free.txt

step "tiny-gpt2 converted to LiteRT (float16 weights) in the model cache"
if SLM_TIER=free .venv/bin/python -c "
import sys
from slm_app.backends.litert_gpt2 import locate
from slm_app.settings import Settings, resolve_tier
s = Settings(tier='free')
try:
    print('already converted:', locate(resolve_tier(s).engine_config(s))[0])
except Exception:
    sys.exit(1)" 2>/dev/null; then
  :
else
  # The same TensorFlow pins as the full install (requirements.txt), in a venv that lives for this step only.
  TF_PINS=$(grep -E '^(tensorflow|tf-keras)==' requirements.txt)
  BUILD=$(mktemp -d "${TMPDIR:-/tmp}/slm-litert-build.XXXXXX")
  trap 'rm -rf "$BUILD"' EXIT
  "$PYTHON" -m venv "$BUILD/venv"
  # The build venv sees .venv's packages (a .pth line), so pip adds only what TensorFlow needs beyond them.
  .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
    > "$("$BUILD/venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')/slm_free_venv.pth"
  # shellcheck disable=SC2086
  "$BUILD/venv/bin/python" -m pip --disable-pip-version-check install --quiet $TF_PINS
  SLM_TIER=free "$BUILD/venv/bin/python" -m slm_app.provisioning.litert
  rm -rf "$BUILD"
fi

step "done: run the app with  SLM_TIER=free .venv/bin/python app.py"
