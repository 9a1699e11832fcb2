"""``make run``: etcd and the four services as local processes, with the demo model deployed.

Everything lives under ``var/`` in the project (etcd data, snapshots, instance dirs, logs).
Ctrl-C (SIGINT) or SIGTERM stops the services in reverse order; the nodeagent stops its
containers on the way out, so nothing is left behind.

By default every process listens on loopback here. ``ClusterConfig.hosts`` puts a process in a
network namespace of its own with the address the others dial it at, which is how the
integration tests run nodes "on separate hosts" (``tests/integration/test_multihost.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from snapwake import errors, etcdauth
from snapwake.etcd import EtcdTls
from snapwake.pki import Identity
from snapwake.testing import ETCD_ROOT, EtcdProcess, free_port, tls_files, wait_for

__all__ = ["Cluster", "ClusterConfig", "Host", "main"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Host:
    """Where one process runs: the address the others dial it at, what it listens on, and the
    network namespace (``ip netns`` name) it runs in."""

    address: str = "127.0.0.1"
    listen: str = ""
    """Host part of its listen address (``0.0.0.0``: every address); empty: ``address``."""
    netns: str | None = None
    """None: the launcher's own network namespace."""

    @property
    def bind(self) -> str:
        return self.listen or self.address

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run in this host's namespace. nsenter joins the network namespace only:
        ``ip netns exec`` would also remount /sys privately, hiding the cgroup fs runc needs."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv] if self.netns else argv


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how the local cluster runs."""

    var_dir: Path = ROOT / "var"
    """Folder for etcd data, snapshots, instance dirs and logs."""
    gateway_port: int = 8000
    """Port of the OpenAI gateway (0 picks a free one)."""
    scheduler_port: int = 7001
    nodeagent_port: int = 7002
    blobstore_port: int = 7003
    etcd_port: int = 2379
    node_name: str = "node-0"
    api_keys: str = ""
    """``key:tenant,...``; empty turns auth off."""
    extra_env: dict[str, str] = field(default_factory=dict)
    """Extra environment for every service (OTEL_* for tracing, say)."""
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    """Extra flags per service name (``{"blobstore": ["--cache-bytes", "..."]}``); a kind's flags
    go to every process of that kind, ``"nodeagent-1"`` adds flags for that one process."""
    schedulers: int = 1
    """Scheduler processes; one leads through the etcd election, the others stand by."""
    nodes: int = 1
    """Nodes, each a nodeagent and a blobstore (peers of each other) with its own dirs."""
    hosts: dict[str, Host] = field(default_factory=dict)
    """Where a process runs, by its name (``"etcd"``, ``"gateway"``, ``"nodeagent-1"``, ...);
    the launcher's loopback for those not named."""
    static_peers: bool = True
    """Give each blobstore the others as ``--peers``; False: only the peers that nodeagents
    find in etcd (the advertised blobstore addresses of the nodes holding a snapshot)."""
    etcd_endpoints: tuple[str, ...] = ()
    """Members of an etcd the caller runs (a test's three-member cluster, say), given to every
    service; empty starts one embedded single-member etcd, as ``make run`` does."""
    etcd_tls: bool = True
    """etcd over TLS with client certificates and auth (``snapwake.etcdauth``), every
    certificate from the development CA in ``var_dir/pki`` (a caller's etcd must use that CA:
    ``EtcdCluster(..., pki=var_dir / "pki")``); False: plaintext (``--etcd-plaintext true``)."""


class Cluster:
    """Starts and stops the processes of one local cluster."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        port = lambda p: p or free_port()  # noqa: E731
        self.ports = {"gateway": port(config.gateway_port), "scheduler": port(config.scheduler_port),
                      "nodeagent": port(config.nodeagent_port), "blobstore": port(config.blobstore_port)}
        # Extra schedulers and nodes are "kind-i" (i >= 1) on free ports; index 0 keeps the plain
        # names, ports and dirs above, so a one-node cluster is what it always was.
        for kind, count in (("scheduler", config.schedulers), ("nodeagent", config.nodes),
                            ("blobstore", config.nodes)):
            for i in range(1, count):
                self.ports[f"{kind}-{i}"] = free_port()
        etcd_host = self.host("etcd")
        self.pki = config.var_dir / "pki"
        self.etcd = EtcdProcess(config.var_dir / "etcd", port(config.etcd_port),
                                log_path=config.var_dir / "logs" / "etcd.log", host=etcd_host.bind,
                                wrapper=etcd_host.wrap([]), pki=self.pki if config.etcd_tls else None)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def gateway_url(self) -> str:
        return f"http://{self.address('gateway')}"

    @property
    def scheduler_address(self) -> str:
        return self.address("scheduler")

    @property
    def scheduler_addresses(self) -> list[str]:
        """Every scheduler's address, the first one's first (what the gateway is given)."""
        return [self.address(n) for n in self.names("scheduler")]

    def host(self, name: str) -> Host:
        """Where the process ``name`` runs."""
        return self.config.hosts.get(name, Host())

    def address(self, name: str) -> str:
        """``host:port`` the others dial the process ``name`` (``"nodeagent-1"``, say) at."""
        return f"{self.host(name).address}:{self.ports[name]}"

    def _listen(self, name: str) -> list[str]:
        """``--listen`` and, when it differs, ``--advertise``."""
        listen = f"{self.host(name).bind}:{self.ports[name]}"
        return ["--listen", listen, *(["--advertise", self.address(name)] if listen != self.address(name) else [])]

    def _blobstore_dial(self, agent: str, blob: str) -> list[str]:
        """How a nodeagent reaches its node's blobstore: over loopback when they share a
        namespace and the blobstore listens everywhere; the node record advertises the address."""
        here, there = self.host(agent), self.host(blob)
        dial = self.address(blob)
        if here.netns == there.netns and there.bind == "0.0.0.0":
            dial = f"127.0.0.1:{self.ports[blob]}"
        return ["--blobstore", dial, *(["--blobstore-advertise", self.address(blob)] if dial != self.address(blob) else [])]

    def names(self, kind: str) -> list[str]:
        """Process names of one kind: ``["scheduler", "scheduler-1", ...]``."""
        count = {"scheduler": self.config.schedulers, "nodeagent": self.config.nodes,
                 "blobstore": self.config.nodes}.get(kind, 1)
        return [kind] + [f"{kind}-{i}" for i in range(1, count)]

    def node_name(self, name: str) -> str:
        """The node name of a ``nodeagent``/``blobstore`` process name."""
        _, _, index = name.partition("-")
        return f"{self.config.node_name}-{index}" if index else self.config.node_name

    def state_dir(self, name: str) -> Path:
        """A nodeagent's state dir (its runc root is ``runc/`` inside)."""
        return self.config.var_dir / name

    @property
    def etcd_address(self) -> str:
        """What the services get as ``--etcd``: every member, comma-separated."""
        return ",".join(self.config.etcd_endpoints) or self.etcd.address

    def etcd_identity(self, name: str) -> Identity | None:
        """The identity process ``name`` talks to etcd as (None: it never does)."""
        kind = name.partition("-")[0]
        if kind == "scheduler":
            return Identity("scheduler", name)
        if kind == "nodeagent":
            return Identity("nodeagent", self.node_name(name))
        return None

    def etcd_tls(self, identity: Identity = ETCD_ROOT) -> EtcdTls | None:
        """``identity``'s etcd client settings (the etcd root's by default); None when plaintext."""
        if not self.config.etcd_tls:
            return None
        return tls_files(self.pki, identity)

    def _etcd_args(self, name: str) -> list[str]:
        identity = self.etcd_identity(name)
        if identity is None:
            return []
        tls = self.etcd_tls(identity)
        if tls is None:
            return ["--etcd-plaintext", "true"]
        return ["--etcd-ca", tls.ca, "--etcd-cert", tls.cert, "--etcd-key", tls.key]

    def start_etcd(self) -> None:
        """Starts the embedded etcd (unless the caller runs one) and, over TLS, sets up its
        users, roles and grants for every scheduler and nodeagent and turns auth on."""
        if not self.config.etcd_endpoints:
            self.etcd.start()
        tls = self.etcd_tls()
        if tls is None:
            return
        users = [i for kind in ("scheduler", "nodeagent") for n in self.names(kind)
                 if (i := self.etcd_identity(n)) is not None]
        deadline = time.monotonic() + 30
        while True:  # a member that just opened its port may still be electing a raft leader
            try:
                etcdauth.bootstrap(self.etcd_address, tls, users, timeout=5)
                return
            except errors.Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _args(self, name: str) -> list[str]:
        var, etcd = self.config.var_dir, self.etcd_address
        kind, _, index = name.partition("-")
        if kind == "scheduler":
            return [*self._listen(name), "--etcd", etcd]
        if kind == "gateway":
            return ["--listen", f"{self.host(name).bind}:{self.ports[name]}",
                    "--scheduler", ",".join(self.scheduler_addresses),
                    *(["--api-keys", self.config.api_keys] if self.config.api_keys else [])]
        blob = "blobstore" + (f"-{index}" if index else "")
        handover = str(var / blob / "handover.sock")
        if kind == "nodeagent":
            return ["--name", self.node_name(name), *self._listen(name), "--etcd", etcd,
                    *self._blobstore_dial(name, blob),
                    "--handover-socket", handover, "--state-dir", str(self.state_dir(name))]
        peers = [self.address(b) for b in self.names("blobstore") if b != blob] if self.config.static_peers else []
        return ["--listen", f"{self.host(name).bind}:{self.ports[name]}", "--dirs",
                f"{var}/{blob}/d0,{var}/{blob}/d1", "--handover-socket", handover,
                *(["--peers", ",".join(peers)] if peers else [])]

    def start_service(self, name: str, timeout: float = 60.0) -> subprocess.Popen[bytes]:
        """Starts ``python -m services.<name>`` and waits until its port answers."""
        logs = self.config.var_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            kind = name.partition("-")[0]
            args = [*self._args(name), *self._etcd_args(name), *self.config.extra_args.get(kind, []),
                    *(self.config.extra_args.get(name, []) if name != kind else [])]
            proc = subprocess.Popen(self.host(name).wrap([sys.executable, "-m", f"services.{kind}", *args]),
                                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
                                    # Own session: a terminal's Ctrl-C reaches only the launcher,
                                    # which then stops the services in order.
                                    start_new_session=True,
                                    env={**os.environ, **self.config.extra_env, "PYTHONUNBUFFERED": "1"})
        self.procs[name] = proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {logs / (name + '.log')}")
            if name == "gateway":
                import httpx
                return httpx.get(self.gateway_url + "/healthz", timeout=1).status_code == 200
            ch = grpc.insecure_channel(self.address(name))
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                return True
            finally:
                ch.close()

        wait_for(up, timeout, f"{name} on port {self.ports[name]}", interval=0.2)
        return proc

    def start(self) -> Cluster:
        self.config.var_dir.mkdir(parents=True, exist_ok=True)
        self.start_etcd()
        for blob, agent in zip(self.names("blobstore"), self.names("nodeagent"), strict=True):
            self.start_service(blob)
            self.start_service(agent)
        for name in (*self.names("scheduler"), "gateway"):
            self.start_service(name)
        return self

    def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop(self) -> None:
        order = ("gateway", "scheduler", "nodeagent", "blobstore")
        for name in sorted(self.procs, key=lambda n: order.index(n.partition("-")[0])):
            self.stop_service(name)
        self.etcd.stop()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def deploy_demo(scheduler: str, model_dir: Path, name: str = "demo", timeout: float = 180.0) -> None:  # noqa: ASYNC109
    """Creates the demo function (if absent) and waits until it is READY."""
    from snapwake import errors
    from snapwake.grpcclient import call
    from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name=name, image="builtin",
                                  model_dir=str(model_dir))
    async with grpc.aio.insecure_channel(scheduler) as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        deadline = time.monotonic() + timeout
        fid = f"default/default/{name}"
        created = False
        while time.monotonic() < deadline:
            try:
                if not created:
                    await call(stub.CreateFunction, scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10)
                    created = True
                got = await call(stub.GetFunction, scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=10)
            except (errors.AlreadyExists, errors.Unavailable) as exc:
                created = created or isinstance(exc, errors.AlreadyExists)
                # Unavailable: a scheduler restarted on a kept etcd waits out the old
                # leader's election lease before it answers.
                await asyncio.sleep(0.5)
                continue
            state = got.function.state
            if state == types_pb2.FUNCTION_STATE_READY:
                return
            if state == types_pb2.FUNCTION_STATE_FAILED:
                raise RuntimeError(f"demo function failed: {got.function.status_message}")
            await asyncio.sleep(0.5)
        raise TimeoutError(f"demo function not ready after {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__)
    parser.add_argument("--gateway-port", type=int, default=8000)
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var")
    opts = parser.parse_args(argv)
    from snapwake.log import setup

    setup("devcluster")
    config = ClusterConfig(var_dir=opts.var_dir.resolve(), gateway_port=opts.gateway_port)
    # The model server's own tool writes the demo model (shared code imports no model server).
    model_dir = Path(subprocess.run([sys.executable, "-m", "modelserver.demo", str(config.var_dir / "models" / "demo"),
                                     "--seed", "0"], check=True, capture_output=True, text=True).stdout.strip())
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    with Cluster(config) as cluster:
        print("deploying the demo model (snapshot build and pre-warm) ...", flush=True)
        asyncio.run(deploy_demo(cluster.scheduler_address, model_dir))
        url = cluster.gateway_url
        print(f"\nSnapwake is up.\n  OpenAI base URL: {url}/v1\n  admin API (gRPC): {cluster.scheduler_address}\n"
              f"  dashboard: {url}/dashboard/\n  logs: {config.var_dir / 'logs'}\n\nTry:\n"
              f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"demo\", \"stream\": true, \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"hello\"}}]}}'\n\nCtrl-C stops everything.", flush=True)
        try:
            while not stop[0]:
                time.sleep(0.5)
                dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
                if dead:
                    print(f"service exited: {', '.join(dead)}; stopping", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
        print("\nstopping ...", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
