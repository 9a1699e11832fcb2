"""Scheduler config: defaults, flags and variables, and every bad key named."""

from __future__ import annotations

import pytest

from services.scheduler.config import SchedulerConfig
from snapwake.config import ConfigError, load

PLAIN = {"SNAPWAKE_ETCD_PLAINTEXT": "true"}  # no etcd client certificate to give here


def test_defaults() -> None:
    cfg = load(SchedulerConfig, argv=[], env=PLAIN)
    assert (cfg.listen, cfg.etcd, cfg.snapshot_attempts) == ("127.0.0.1:7001", "127.0.0.1:2379", 3)


def test_flags_beat_environment() -> None:
    cfg = load(SchedulerConfig, argv=["--listen", "0.0.0.0:7100"],
               env={**PLAIN, "SNAPWAKE_LISTEN": "127.0.0.1:1", "SNAPWAKE_CLAIM_TTL_S": "30"})
    assert (cfg.listen, cfg.claim_ttl_s) == ("0.0.0.0:7100", 30.0)


@pytest.mark.parametrize(("env", "named"), [
    ({"SNAPWAKE_LISTEN": "nope"}, "listen"),
    ({"SNAPWAKE_ETCD": "host:99999"}, "etcd"),
    ({"SNAPWAKE_ADVERTISE": "x"}, "advertise"),
    ({"SNAPWAKE_ELECTION_TTL_S": "0"}, "election_ttl_s"),
    ({"SNAPWAKE_CLAIM_TTL_S": "abc"}, "SNAPWAKE_CLAIM_TTL_S"),
    ({"SNAPWAKE_RECONCILE_INTERVAL_S": "-1"}, "reconcile_interval_s"),
    ({"SNAPWAKE_LOG_LEVEL": "loud"}, "log_level"),
])
def test_bad_keys_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(SchedulerConfig, argv=[], env={**PLAIN, **env})
