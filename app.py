"""Entry point, for `python app.py` and for Hugging Face Spaces (app_file: app.py)."""

import logging
import os

# Before anything imports gradio or huggingface_hub: no analytics, no hub telemetry.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from slm_app.memory_fit import MemoryDoesNotFit  # noqa: E402
from slm_app.server import build_app, serve  # noqa: E402


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Gradio's own variables, so the app binds where a Space (or a user) expects. No public share link, ever.
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    try:
        app = build_app()
    except MemoryDoesNotFit as exc:  # refuse clearly rather than be killed for memory mid-load
        raise SystemExit(f"slm-space: not starting: {exc}") from None
    # SIGTERM drains (SLM_DRAIN_S) and exits 0: see slm_app.server.DrainingServer.
    serve(app, host, port)


if __name__ == "__main__":
    main()
