"""Serving a trained run: vLLM's OpenAI-compatible server with the run's adapters."""
