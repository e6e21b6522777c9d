"""A finished reference cache built once per module, and a fresh copy of it per test."""

from __future__ import annotations

import shutil

import pytest

from potstill.signals.cache import write_cache

from .cache_helpers import SPEC, encode


@pytest.fixture(scope="module")
def built(tmp_path_factory, _tiny_teacher_session, _tiny_tokenizer_session):
    """A finished reference cache (read-only: tests that damage a cache copy it first)."""
    path = tmp_path_factory.mktemp("cache") / "ref"
    exs = encode(_tiny_tokenizer_session)
    man = write_cache(_tiny_teacher_session, _tiny_tokenizer_session, exs, path, SPEC, progress=False)
    assert man is not None and man["num_shards"] == 3
    return path, exs


@pytest.fixture
def cache_copy(built, tmp_path):
    ref, exs = built
    path = tmp_path / "cache"
    shutil.copytree(ref, path)
    return path, exs
