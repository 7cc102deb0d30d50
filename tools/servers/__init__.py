"""Loopback servers for tests and the demo: an S3-compatible store, an OpenAI-compatible chat server."""
