"""Gateway config: listen and the dead-node bound are keys (flags and SNAPWAKE_* variables),
every bad key is named, and the bound becomes the instance sockets' keepalive options."""

from __future__ import annotations

import socket

import pytest

from services.gateway.config import GatewayConfig
from services.gateway.proxy import dead_node_options
from snapwake.config import ConfigError, load


def test_listen_and_dead_node_timeout_come_from_the_environment() -> None:
    cfg = load(GatewayConfig, argv=[], env={"SNAPWAKE_LISTEN": "0.0.0.0:8000", "SNAPWAKE_DEAD_NODE_TIMEOUT": "3"})
    assert (cfg.listen, cfg.dead_node_timeout) == ("0.0.0.0:8000", 3.0)
    assert load(GatewayConfig, argv=[], env={}).listen == "127.0.0.1:8000"


@pytest.mark.parametrize(("env", "named"), [
    ({"SNAPWAKE_LISTEN": "8000"}, "listen"),
    ({"SNAPWAKE_DEAD_NODE_TIMEOUT": "0"}, "dead_node_timeout"),
    ({"SNAPWAKE_DEAD_NODE_TIMEOUT": "soon"}, "SNAPWAKE_DEAD_NODE_TIMEOUT"),
])
def test_bad_keys_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(GatewayConfig, argv=[], env=env)


@pytest.mark.parametrize(("seconds", "idle", "interval", "user_timeout_ms"), [
    (20.0, 10, 5, 20_000),
    (3.0, 1, 1, 3_000),
    (0.5, 1, 1, 1_000),  # whole seconds for the probes, at least one
])
def test_dead_node_options(seconds: float, idle: int, interval: int, user_timeout_ms: int) -> None:
    options = {(level, name): value for level, name, value in dead_node_options(seconds)}
    assert options[(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] == 1
    assert options[(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)] == idle
    assert options[(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)] == interval
    assert options[(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)] == user_timeout_ms
    with socket.socket() as s:  # the kernel takes every one of them
        for level, name, value in dead_node_options(seconds):
            s.setsockopt(level, name, value)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == user_timeout_ms
