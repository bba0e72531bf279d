"""peft LoRA → GGUF LoRA adapter, with llama.cpp's own ``convert_lora_to_gguf.py``.

The script (with its ``conversion`` package and ``gguf-py``) ships in llama-cpp-python's source
distribution on PyPI, the same version the pro tier compiles, so the adapter format always matches
the llama.cpp that loads it. Set-up fetches the sdist and unpacks only those files into the cache:

    python -m slm_app.finetune.convert --install     (./setup.sh --finetune does this)

At run time nothing is downloaded: a missing converter is a clear error naming that command. The
script runs in its own process (it imports torch), with the adapter's directory as ``--base``: the
trainer writes the base model's ``config.json`` there, so the hub is never asked.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # the pro tier's pin in setup.sh
_SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
_MEMBERS = ("vendor/llama.cpp/convert_lora_to_gguf.py", "vendor/llama.cpp/convert_hf_to_gguf.py",
            "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/", "vendor/llama.cpp/LICENSE")


class ConverterMissing(RuntimeError):
    """The conversion script is not in the cache; the message says how to get it."""


def converter_dir(cache_dir: Path) -> Path:
    return Path(cache_dir).expanduser() / "llama_cpp_convert" / LLAMA_CPP_PYTHON


def converter_script(cache_dir: Path) -> Path:
    script = converter_dir(cache_dir) / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise ConverterMissing(f"llama.cpp's convert_lora_to_gguf.py is not in {converter_dir(cache_dir)}: "
                               f"run ./setup.sh --finetune (or python -m slm_app.finetune.convert --install)")
    return script


def install(cache_dir: Path, sdist: Path | None = None) -> Path:
    """Unpack the converter from llama-cpp-python's sdist (downloaded with pip when not given)."""
    target = converter_dir(cache_dir)
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
            sdist = Path(tmp) / f"{_SDIST}.tar.gz"
        staging = Path(tmp) / "unpacked"
        with tarfile.open(sdist) as tar:
            wanted = [m for m in tar.getmembers()
                      if any(m.name.startswith(f"{_SDIST}/{p}") for p in _MEMBERS) and (m.isfile() or m.isdir())]
            tar.extractall(staging, members=wanted, filter="data")
        source = staging / _SDIST / "vendor" / "llama.cpp"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        os.replace(partial, target)  # complete or absent: never half a converter
    return target


def convert_command(cache_dir: Path, adapter_dir: Path, out_file: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment that convert ``adapter_dir`` (peft + config.json) to ``out_file``."""
    script = converter_script(cache_dir)
    root = script.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "gguf-py")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(script), str(adapter_dir), "--base", str(adapter_dir), "--outtype", "f16",
           "--outfile", str(out_file)]
    return cmd, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slm_app.finetune.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help="fetch and unpack the converter into the cache")
    parser.add_argument("--sdist", type=Path, default=None, help="use this llama-cpp-python sdist instead of pip")
    args = parser.parse_args(argv)
    from slm_app.settings import load_settings

    cache = Path(load_settings().cache_dir)
    if args.install:
        print(f"llama.cpp LoRA converter: {install(cache, args.sdist)}")
        return 0
    try:
        print(converter_script(cache))
    except ConverterMissing as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
