"""Fixtures for the eval tests (no hub); the builders live in :mod:`.tiny`."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from .tiny import make_word_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer()
