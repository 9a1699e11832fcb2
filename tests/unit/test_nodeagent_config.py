"""NodeAgentConfig validation names every bad key; the fake model server honours the interface."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from services.nodeagent.bundle import BundleSpec, write_bundle
from services.nodeagent.config import NodeAgentConfig
from services.nodeagent.containers import ContainerStatus, FakeContainers
from snapwake.config import ConfigError, load

PLAIN = {"SNAPWAKE_ETCD_PLAINTEXT": "true"}  # no etcd client certificate to give here


@pytest.mark.parametrize(("argv", "needle"), [
    (["--listen", "nope"], "listen"),
    (["--etcd", "host"], "etcd"),
    (["--blobstore", "x:99999"], "blobstore"),
    (["--advertise", "a:b"], "advertise"),
    (["--listen", "0.0.0.0:7070"], "advertise: 0.0.0.0:7070 is no address"),
    (["--advertise", "[::]:7070"], "advertise"),
    (["--blobstore", "0.0.0.0:7080"], "blobstore_advertise: 0.0.0.0:7080 is no address"),
    (["--blobstore-advertise", "peer"], "blobstore_advertise"),
    (["--endpoint-host", "0.0.0.0"], "endpoint_host"),
    (["--containers", "docker"], "containers"),
    (["--gpus", "2"], "gpus"),
    (["--lease-ttl", "1"], "lease_ttl"),
    (["--lease-ttl", "soon"], "--lease-ttl"),
    (["--name", "a/b"], "name"),
    (["--handover-socket", "rel.sock"], "handover_socket"),
    (["--repo-root", "/nonexistent"], "repo_root"),
    (["--image-cache-dir", "rel/images"], "image_cache_dir"),
    (["--image-cache-max-bytes", "-1"], "image_cache_max_bytes"),
    (["--image-secrets-dir", "secrets"], "image_secrets_dir"),
    (["--image-local-roots", "/srv/images,/"], "image_local_roots"),
    (["--gpu-memory-watch", "maybe"], "--gpu-memory-watch"),
    (["--gpu-memory-builtin-allowance-bytes", "-1"], "gpu_memory_builtin_allowance_bytes"),
    (["--user-idle-quiet-s", "0"], "user_idle_quiet_s"),
    (["--user-idle-quiet-s", "-0.5"], "user_idle_quiet_s"),
    (["--standby-host-memory-fraction", "0"], "standby_host_memory_fraction"),
    (["--standby-host-memory-fraction", "1.5"], "standby_host_memory_fraction"),
])
def test_bad_keys_are_named(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(NodeAgentConfig, argv, env=PLAIN)


def test_defaults_and_derived_paths() -> None:
    config = load(NodeAgentConfig, ["--state-dir", "/s", "--listen", "10.0.0.5:1"], env=PLAIN)
    assert config.runc_root == Path("/s/runc") and config.instances_dir == Path("/s/instances")
    assert config.advertise_address == "10.0.0.5:1" and config.image_root == Path("/s/images")
    assert (config.instance_host, config.blobstore_advertise_address) == ("10.0.0.5", "127.0.0.1:7080")
    assert config.user_idle_quiet_s == 1.0
    assert load(NodeAgentConfig, ["--user-idle-quiet-s", "2.5"], env=PLAIN).user_idle_quiet_s == 2.5
    assert load(NodeAgentConfig, ["--image-cache-dir", "/var/images"], env=PLAIN).image_root == Path("/var/images")
    assert load(NodeAgentConfig, [], env={**PLAIN, "SNAPWAKE_ADVERTISE": "h:2"}).advertise_address == "h:2"
    # A node on its own host: listen everywhere, advertise what other hosts dial.
    spread = load(NodeAgentConfig, ["--listen", "0.0.0.0:7070", "--blobstore", "127.0.0.1:7080"],
                  env={**PLAIN, "SNAPWAKE_ADVERTISE": "10.0.0.5:7070", "SNAPWAKE_BLOBSTORE_ADVERTISE": "10.0.0.5:7080"})
    assert (spread.advertise_address, spread.instance_host, spread.blobstore_advertise_address) == (
        "10.0.0.5:7070", "10.0.0.5", "10.0.0.5:7080")
    assert (config.gpu_memory_watch, config.gpu_memory_builtin_allowance_bytes) == (True, 2 << 30)
    assert load(NodeAgentConfig, ["--gpu-memory-watch", "off"], env=PLAIN).gpu_memory_watch is False
    assert config.standby_host_memory_fraction == 0.8


async def test_fake_runtime_runs_the_bundle_process(tmp_path: Path) -> None:
    spec = BundleSpec(args=(sys.executable, "-c", "import os,time; print(os.environ['X'], flush=True); time.sleep(30)"),
                      env={"X": "hello"}, cwd=str(tmp_path), hostname="i-1")
    bundle = write_bundle(tmp_path / "bundle", spec)
    containers = FakeContainers()
    pid = await containers.run("sw-a", bundle, tmp_path / "out.log")
    assert (await containers.state("sw-a")).pid == pid  # type: ignore[union-attr]
    assert [s.id for s in await containers.list()] == ["sw-a"]
    for _ in range(100):
        if (tmp_path / "out.log").read_text().strip() == "hello":
            break
        await asyncio.sleep(0.05)
    assert (tmp_path / "out.log").read_text().strip() == "hello"
    await containers.kill("sw-a")
    for _ in range(100):
        state = await containers.state("sw-a")
        if state is not None and state.status is ContainerStatus.STOPPED:
            break
        await asyncio.sleep(0.05)
    assert state is not None and not state.alive
    await containers.delete("sw-a")
    assert await containers.state("sw-a") is None and await containers.list() == []
