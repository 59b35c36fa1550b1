"""The OpenAI-compatible HTTP API: request checks, response objects, and the Starlette app."""
