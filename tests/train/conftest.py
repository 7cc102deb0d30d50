"""Shared by the training tests: the session's curated demo output (tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def curated(demo_output):
    """(curated output folder, its tokenizer.json): the demo's three kinds, curated once."""
    return demo_output
