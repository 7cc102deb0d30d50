"""Session-wide guards: nothing in the tests may reach the network."""

from __future__ import annotations

import os

# albumentations (pulled in by img2dataset) checks PyPI for updates on import; wandb and the
# Hugging Face hub must stay offline too.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
