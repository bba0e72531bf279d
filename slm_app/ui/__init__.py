"""The Gradio UI: ``app`` builds the Blocks and its tabs (``chat``, ``tools``, ``evaluate``); ``controls``
holds shared widgets and ``errors`` the one ``gr.Error`` adapter."""
