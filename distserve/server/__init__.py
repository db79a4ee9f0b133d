"""The OpenAI-compatible HTTP API (FastAPI), its error bodies and its metrics."""
