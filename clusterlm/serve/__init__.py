"""OpenAI-compatible HTTP serving."""
