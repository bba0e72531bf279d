"""slm-space: small language models on CPU behind a Gradio Space, gradio_client and HTTP."""

__version__ = "0.1.0"
