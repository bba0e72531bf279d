# slm-space in a container. The tier is chosen at build time (what set-up installs and prepares) and
# read from the environment at run time:
#   docker build -t slm-space .                                  free tier (LiteRT, ~200 MB RSS)
#   docker build --build-arg SLM_TIER=standard -t slm-space:standard .
#   docker run -p 7860:7860 --memory 512m slm-space
FROM python:3.11-slim

ARG SLM_TIER=free
ENV SLM_TIER=${SLM_TIER} \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/home/app

# The pro tier compiles llama-cpp-python: it needs a C/C++ toolchain (the other tiers install wheels only).
# hadolint ignore=DL3008
RUN if [ "$SLM_TIER" = pro ]; then \
        apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN useradd --create-home --uid 1000 app
USER 1000:1000
WORKDIR /home/app/slm-space
COPY --chown=1000:1000 . .

# Models are prepared now, at build time, into the app user's cache (~/.cache/slm_app), so a container
# starts without converting or downloading anything.
RUN if [ "$SLM_TIER" = free ]; then ./setup_lightweight.sh; \
    elif [ "$SLM_TIER" = pro ]; then ./setup.sh; \
    else SLM_SETUP_PRO=0 ./setup.sh; fi

EXPOSE 7860
# Readiness: /health answers 200 once the model is loaded (503 while loading; /healthz is liveness).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD [".venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health', timeout=4)"]
CMD [".venv/bin/python", "app.py"]
