"""etcd members as configured (``parse_endpoints``) and as the gRPC target the client dials
(``channel_target``), as tables."""

from __future__ import annotations

import pytest

from services.nodeagent.config import NodeAgentConfig
from services.scheduler.config import SchedulerConfig
from snapwake.config import parse_endpoints
from snapwake.etcd import channel_target


@pytest.mark.parametrize(("value", "members"), [
    ("127.0.0.1:2379", [("127.0.0.1", 2379)]),
    ("10.0.0.1:2379, 10.0.0.2:2379,10.0.0.3:2379", [("10.0.0.1", 2379), ("10.0.0.2", 2379), ("10.0.0.3", 2379)]),
    ("etcd-0.etcd:2379,etcd-1.etcd:2379,", [("etcd-0.etcd", 2379), ("etcd-1.etcd", 2379)]),
    ("[::1]:2379", [("::1", 2379)]),
])
def test_parse_endpoints(value: str, members: list[tuple[str, int]]) -> None:
    assert parse_endpoints(value) == members


@pytest.mark.parametrize("value", ["", " , ", "127.0.0.1", "a:1,b", "a:99999"])
def test_parse_endpoints_refuses(value: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoints(value)


@pytest.mark.parametrize(("members", "target"), [
    ([("127.0.0.1", 2379)], "127.0.0.1:2379"),
    ([("etcd.ns.svc", 2379)], "etcd.ns.svc:2379"),  # gRPC's DNS resolver: every A record, re-resolved
    ([("::1", 2379)], "[::1]:2379"),
    ([("10.0.0.1", 2379), ("10.0.0.2", 22379)], "ipv4:10.0.0.1:2379,10.0.0.2:22379"),
    ([("fd00::1", 2379), ("fd00::2", 2379)], "ipv6:[fd00::1]:2379,[fd00::2]:2379"),
    ([("::1", 2379), ("127.0.0.1", 2379)], "ipv4:127.0.0.1:2379"),  # one kind per target: IPv4 first
])
def test_channel_target(members: list[tuple[str, int]], target: str) -> None:
    assert channel_target(members) == target


@pytest.mark.parametrize("cls", [SchedulerConfig, NodeAgentConfig])
def test_service_configs_take_every_member(cls: type[SchedulerConfig] | type[NodeAgentConfig]) -> None:
    assert not [p for p in cls(etcd="10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379", etcd_plaintext=True).validate() if "etcd" in p]
    assert [p for p in cls(etcd="10.0.0.1:2379,10.0.0.2").validate() if p.startswith("etcd:")]
