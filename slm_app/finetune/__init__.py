"""Learning from feedback: data preparation, LoRA training in a subprocess, conversion to a GGUF
adapter, an evaluation gate, and the adapters the llama.cpp backend swaps at run time.

* ``data``: feedback store or a user's file → deterministic train/validation/test splits + manifest.
* ``train_llama``: the trainer (torch + peft), run only as a subprocess: the server never imports torch.
* ``convert``: peft adapter → GGUF LoRA with llama.cpp's ``convert_lora_to_gguf.py``.
* ``jobs``: one job at a time (prepare → train → convert → gate → promote), progress, cancel.
* ``gate``: candidate vs current on the new data, a regression text, checks and ROUGE-L.
* ``adapters``: the adapters on disk with their cards, and which one is promoted.
* ``serving``: switching the served adapter without mixing requests (``AdapterRouter``).
"""
