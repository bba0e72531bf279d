"""Prepare the offline models ahead of time (setup scripts call this; the app does the same
lazily on first start when they are missing).

    python -m slm_app.prepare          tiny-gpt2 built locally (free tier's offline fallback)
    python -m slm_app.prepare --pro    also the embedded Gemma 3 270M GGUF (pro tier's fallback)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from slm_app.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pro", action="store_true", help="also unpack the embedded GGUF for the pro tier")
    args = parser.parse_args(argv)
    cache = Path(load_settings().cache_dir)

    from slm_app.provisioning.tiny_gpt2 import build_offline_tiny_gpt2, offline_tiny_gpt2_dir

    start = time.perf_counter()
    path = build_offline_tiny_gpt2(offline_tiny_gpt2_dir(cache))
    print(f"tiny-gpt2 (offline, random weights): {path} ({time.perf_counter() - start:.1f} s)")
    if args.pro:
        from slm_app.backends.llama_cpp_backend import embedded_gguf

        start = time.perf_counter()
        gguf = embedded_gguf(cache)
        print(f"Gemma 3 270M Q4_K_M (embedded GGUF): {gguf} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
