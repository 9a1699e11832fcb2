"""Shared fixtures: a real etcd per session, the tiny demo model, free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from snapwake.testing import EtcdProcess


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """A real etcd process on loopback for the whole session; tests use distinct key prefixes
    or clean up after themselves."""
    with EtcdProcess(tmp_path_factory.mktemp("etcd") / "data") as proc:
        yield proc


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-architecture model in the Hugging Face layout (seeded, made locally)."""
    from modelserver.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("models") / "demo", seed=0)
