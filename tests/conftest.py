"""Shared fixtures: a real etcd per session, the tiny demo model, the Debian test image, free ports."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from oci_image import TestImage, build_debian_python_image

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


@pytest.fixture(scope="session")
def debian_python_image(tmp_path_factory: pytest.TempPathFactory) -> TestImage:
    """A user image built from Debian packages (mmdebstrap minbase + python3, umoci; ~40 s, once
    per session): an OCI layout and its oci-archive with the variants "serve" (tests/oci_server.py,
    an OpenAI-style echo server on 8000), "exits", "no-port" and "no-command" sharing one base
    layer; ``.ref(variant)`` is its reference. SNAPWAKE_TEST_IMAGE_DIR keeps the build across
    sessions (rebuilt when tests/oci_image.py or tests/oci_server.py change)."""
    keep = os.environ.get("SNAPWAKE_TEST_IMAGE_DIR")
    return build_debian_python_image(Path(keep) if keep else tmp_path_factory.mktemp("debian-image"))
