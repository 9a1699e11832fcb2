"""``make run``: etcd and the four services as local processes, with the demo model deployed.

Everything lives under ``var/`` in the project (etcd data, snapshots, instance dirs, logs).
Ctrl-C (SIGINT) or SIGTERM stops the services in reverse order; the nodeagent stops its
containers on the way out, so nothing is left behind.

By default every process listens on loopback here. ``ClusterConfig.hosts`` puts a process in a
network namespace of its own with the address the others dial it at, which is how the
integration tests run nodes "on separate hosts" (``tests/integration/test_multihost.py``).

TLS (``ClusterConfig.tls``, on by default): a development CA in ``var/pki`` and one certificate
per process (``var/pki/<process>/``, ``snapwake.pki``), given as ``--tls-dir``. The scheduler
serves gateways' claims on its mutual-TLS port (``internal_address``) and the admin API on the
port tests and people dial (``address``/``scheduler_address``, server-authenticated TLS).
Tests reach it through ``admin_channel``, and any service as a given identity through
``channel_as``; ``client_tls`` and ``cli_args`` give the same to other clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from snapwake import errors, etcdauth
from snapwake.etcd import EtcdTls
from snapwake.grpcclient import blocking_channel
from snapwake.pki import Identity, create_ca, issue_dir
from snapwake.testing import ETCD_ROOT, EtcdProcess, free_port, tls_files, wait_for
from snapwake.tlsconfig import ClientTls

__all__ = ["Cluster", "ClusterConfig", "Host", "Supervisor", "main"]

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
    """The scheduler's admin port (TLS without a client certificate: CLI, grpcurl)."""
    scheduler_internal_port: int = 7000
    """Its mutual-TLS port (gateways' claims); a free one when ``scheduler_port`` is 0."""
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
    gateways: int = 1
    """Gateway processes (``gateway``, ``gateway-1``, ...), each on its own port, all alike."""
    nodes: int = 1
    """Nodes, each a nodeagent and a blobstore (peers of each other) with its own dirs."""
    hosts: dict[str, Host] = field(default_factory=dict)
    """Where a process runs, by its name (``"etcd"``, ``"gateway"``, ``"nodeagent-1"``, ...);
    the launcher's loopback for those not named."""
    static_peers: bool = True
    """Give each blobstore the others as ``--peers``; False: only the peers that nodeagents
    find in etcd (the advertised blobstore addresses of the nodes holding a snapshot)."""
    admin_auth: bool = False
    """Run the scheduler with ``admin_auth`` (``make run`` does): an operator token is written to
    ``access/operator.token`` under ``var_dir`` (``services.scheduler.bootstrap``), the gateway
    gets a token of its own, the API-key secret and the audit log (``logs/audit.log``)."""
    etcd_endpoints: tuple[str, ...] = ()
    """Members of an etcd the caller runs (a test's three-member cluster, say), given to every
    service; empty starts one embedded single-member etcd, as ``make run`` does."""
    tls: bool = True
    """Mutual TLS between the services, certificates from a development CA in ``var/pki``;
    False runs every service with ``--dev-plaintext``."""
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
                            ("blobstore", config.nodes), ("gateway", config.gateways)):
            for i in range(1, count):
                self.ports[f"{kind}-{i}"] = free_port()
        # A scheduler's ``ports`` entry is its admin port; gateways dial this one (mutual TLS).
        self.internal_ports = {name: free_port() for name in self.names("scheduler")}
        if config.scheduler_port and config.scheduler_internal_port:
            self.internal_ports["scheduler"] = config.scheduler_internal_port
        # Plaintext ports serving only grpc.health.v1 (what kubelet's probes dial).
        self.health_ports = {n: free_port() for k in ("scheduler", "nodeagent", "blobstore") for n in self.names(k)}
        self.pki_dir = config.var_dir / "pki"
        etcd_host = self.host("etcd")
        self.pki = config.var_dir / "pki"
        self.etcd = EtcdProcess(config.var_dir / "etcd", port(config.etcd_port),
                                log_path=config.var_dir / "logs" / "etcd.log", host=etcd_host.bind,
                                wrapper=etcd_host.wrap([]), pki=self.pki if config.etcd_tls else None)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.supervisor: Supervisor | None = None

    @property
    def gateway_url(self) -> str:
        return f"http://{self.address('gateway')}"

    @property
    def scheduler_address(self) -> str:
        return self.address("scheduler")

    @property
    def scheduler_addresses(self) -> list[str]:
        """Every scheduler's admin address, the first one's first (what the CLI is given)."""
        return [self.address(n) for n in self.names("scheduler")]

    def internal_address(self, name: str) -> str:
        """``host:port`` of the mutual-TLS port of the process ``name`` (a scheduler's claim port;
        the one port of a nodeagent or blobstore)."""
        port = self.internal_ports.get(name) or self.ports[name]
        return f"{self.host(name).address}:{port}"

    # --- TLS -----------------------------------------------------------------------------
    def identity(self, name: str) -> Identity:
        """The identity of the process ``name``: ``nodeagent/<its node>``, ``scheduler/scheduler-1``."""
        kind = name.partition("-")[0]
        return Identity(kind, self.node_name(name) if kind in ("nodeagent", "blobstore") else name)

    @property
    def ca_path(self) -> Path:
        return self.pki_dir / "ca.crt"

    def _issue(self, folder: str, identity: Identity, hosts: list[str]) -> Path:
        out = self.pki_dir / folder
        issue_dir(create_ca(self.pki_dir), out, identity, hosts)
        return out

    def issue_certificates(self) -> None:
        """Every process's certificate (a caller that starts the processes itself calls this
        first, as ``start`` does); nothing when the cluster runs plaintext."""
        if self.config.tls:
            self._issue_all()

    def _issue_all(self) -> None:
        for kind in ("gateway", "scheduler", "nodeagent", "blobstore"):
            for name in self.names(kind):
                host = self.host(name)
                self._issue(name, self.identity(name), [h for h in (host.address, host.listen) if h and h != "0.0.0.0"])

    def client_tls(self, identity: Identity | None = None) -> ClientTls | None:
        """What a client of this cluster needs: the CA only (admin callers), or also a
        certificate of ``identity`` (issued on first use); None when the cluster runs plaintext."""
        if not self.config.tls:
            return None
        ca = create_ca(self.pki_dir).cert_path.read_bytes()
        if identity is None:
            return ClientTls(ca)
        folder = self.pki_dir / f"client-{identity.role}-{identity.name}"
        if not (folder / "tls.crt").exists():
            self._issue(folder.name, identity, [])
        return ClientTls(ca, (folder / "tls.crt").read_bytes(), (folder / "tls.key").read_bytes())

    def admin_channel(self, name: str = "scheduler") -> grpc.Channel:
        """A blocking channel to a scheduler's admin API, as the CLI or grpcurl reach it."""
        return blocking_channel(self.address(name), self.client_tls(), server_role="scheduler")

    def channel_as(self, name: str, identity: Identity) -> grpc.Channel:
        """A blocking channel to the mutual-TLS port of the process ``name`` (``"nodeagent-1"``),
        presenting a certificate of ``identity``."""
        return blocking_channel(self.internal_address(name), self.client_tls(identity),
                                server_role=name.partition("-")[0])

    def cli_args(self) -> list[str]:
        """``snapwake`` flags reaching this cluster's admin API (after ``--scheduler``)."""
        return ["--ca", str(self.ca_path)] if self.config.tls else ["--plaintext"]

    def health_address(self, name: str) -> str:
        """``host:port`` of the plaintext health-only port of the process ``name``."""
        return f"{self.host(name).address}:{self.health_ports[name]}"

    def _tls_args(self, name: str) -> list[str]:
        health = ["--health-listen", f"{self.host(name).bind}:{self.health_ports[name]}"] if name in self.health_ports else []
        return [*(["--tls-dir", str(self.pki_dir / name)] if self.config.tls else ["--dev-plaintext"]), *health]

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
                 "blobstore": self.config.nodes, "gateway": self.config.gateways}.get(kind, 1)
        return [kind] + [f"{kind}-{i}" for i in range(1, count)]

    def node_name(self, name: str) -> str:
        """The node name of a ``nodeagent``/``blobstore`` process name."""
        _, _, index = name.partition("-")
        return f"{self.config.node_name}-{index}" if index else self.config.node_name

    def state_dir(self, name: str) -> Path:
        """A nodeagent's state dir (its runc root is ``runc/`` inside)."""
        return self.config.var_dir / name

    @property
    def token_file(self) -> Path:
        """The operator token ``make run`` writes (with ``admin_auth``)."""
        return self.config.var_dir / "access" / "operator.token"

    def _access_args(self, kind: str) -> list[str]:
        if not self.config.admin_auth:
            return []
        access = self.config.var_dir / "access"
        if kind == "scheduler":
            return ["--admin-auth", "true", "--audit-log", str(self.config.var_dir / "logs" / "audit.log"),
                    "--api-key-secret-file", str(access / "apikey.secret")]
        return ["--api-key-secret-file", str(access / "apikey.secret"),
                "--admin-token-file", str(access / "gateway.token")]

    def bootstrap_access(self) -> None:
        """Operator and gateway tokens and the API-key secret, in files (kept across runs)."""
        access = self.config.var_dir / "access"
        for name, extra in (("operator", ["--secret-file", str(access / "apikey.secret")]), ("gateway", [])):
            subprocess.run([sys.executable, "-m", "services.scheduler.bootstrap", "--etcd", self.etcd_address,
                            *self._etcd_args(self.names("scheduler")[0]),
                            "--token-file", str(access / f"{name}.token"), "--description", f"make run: {name}",
                            *extra], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)

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
        tls = self._tls_args(name)
        if kind == "scheduler":
            internal = self.internal_address(name)
            return ["--listen", f"{self.host(name).bind}:{self.internal_ports[name]}", "--advertise", internal,
                    "--admin-listen", f"{self.host(name).bind}:{self.ports[name]}", "--etcd", etcd, *tls,
                    *self._access_args(kind)]
        if kind == "gateway":
            return ["--listen", f"{self.host(name).bind}:{self.ports[name]}", *tls,
                    "--scheduler", ",".join(self.internal_address(n) for n in self.names("scheduler")),
                    *(["--api-keys", self.config.api_keys] if self.config.api_keys else []),
                    *self._access_args(kind)]
        blob = "blobstore" + (f"-{index}" if index else "")
        handover = str(var / blob / "handover.sock")
        if kind == "nodeagent":
            return ["--name", self.node_name(name), *self._listen(name), "--etcd", etcd,
                    *self._blobstore_dial(name, blob),
                    "--handover-socket", handover, "--state-dir", str(self.state_dir(name)), *tls]
        peers = [self.address(b) for b in self.names("blobstore") if b != blob] if self.config.static_peers else []
        return ["--listen", f"{self.host(name).bind}:{self.ports[name]}", "--dirs",
                f"{var}/{blob}/d0,{var}/{blob}/d1", "--handover-socket", handover,
                *(["--peers", ",".join(peers)] if peers else []), *tls]

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
            if kind == "gateway":
                import httpx
                return httpx.get(f"http://{self.address(name)}/healthz", timeout=1).status_code == 200
            ch = blocking_channel(self.internal_address(name), self.client_tls(Identity("admin", "devcluster")),
                                  server_role=kind)
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                return True
            finally:
                ch.close()

        wait_for(up, timeout, f"{name} on port {self.ports[name]}", interval=0.2)
        return proc

    def start(self) -> Cluster:
        self.config.var_dir.mkdir(parents=True, exist_ok=True)
        self.issue_certificates()
        self.start_etcd()
        for blob, agent in zip(self.names("blobstore"), self.names("nodeagent"), strict=True):
            self.start_service(blob)
            self.start_service(agent)
        if self.config.admin_auth:
            self.bootstrap_access()
        for name in (*self.names("scheduler"), *self.names("gateway")):
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

    def kill(self, name: str) -> int:
        """SIGKILL to the process ``name``, as a crash: it stays in ``procs`` (dead), so a
        ``Supervisor`` restarts it; ``stop_service`` is the deliberate stop. Returns its pid."""
        proc = self.procs[name]
        proc.kill()
        proc.wait(10)
        return proc.pid

    def supervise(self, etcd_members: dict[str, EtcdProcess] | None = None, **options: float) -> Supervisor:
        """Starts a ``Supervisor`` over this cluster's processes (and ``etcd_members``)."""
        self.supervisor = Supervisor(self, etcd_members, **options).start()
        return self.supervisor

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
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


class Supervisor:
    """Restarts the cluster's processes when they die, as systemd's ``Restart=always`` would.

    Every ``poll_s`` it looks at the service processes in ``cluster.procs`` (a deliberate
    ``stop_service`` removes one from there, so only crashes and kills are restarted), the
    embedded etcd, and any etcd members it is given by name (a test's ``EtcdCluster``). A dead
    one is started again after a backoff: ``backoff_s``, doubled (up to ``max_backoff_s``) each
    time it dies within ``stable_s`` of its last start, so a process that cannot start does not
    spin. Restarts run one at a time on the supervisor's thread (a service restart waits until
    its port answers). ``hold(name)`` leaves a process down until ``release(name)``, for an
    operator's planned stop. ``events`` records each restart: name, when it was seen dead and
    when it was back (``time.monotonic()``), and an error when a start failed.
    """

    def __init__(self, cluster: Cluster, etcd_members: dict[str, EtcdProcess] | None = None, *,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, stable_s: float = 30.0,
                 poll_s: float = 0.2) -> None:
        self.cluster = cluster
        self.etcd_members = dict(etcd_members or {})
        if not cluster.config.etcd_endpoints:
            self.etcd_members.setdefault("etcd", cluster.etcd)
        self.backoff_s, self.max_backoff_s, self.stable_s, self.poll_s = backoff_s, max_backoff_s, stable_s, poll_s
        self.events: list[dict[str, object]] = []
        self._held: set[str] = set()
        self._dead_since: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(90)

    def hold(self, *names: str) -> None:
        self._held.update(names)

    def release(self, *names: str) -> None:
        self._held.difference_update(names)

    def _dead(self) -> list[str]:
        dead = [n for n, p in list(self.cluster.procs.items()) if p.poll() is not None]
        dead += [n for n, m in self.etcd_members.items() if m.proc is not None and m.proc.poll() is not None]
        return [n for n in dead if n not in self._held]

    def _restart(self, name: str) -> None:
        member = self.etcd_members.get(name)
        if member is not None:
            member.spawn()
            member.wait_ready(30)
        else:
            self.cluster.start_service(name)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            for name in self._dead():
                if name not in self._dead_since:
                    self._dead_since[name] = now
                    quick = now - self._started.get(name, float("-inf")) < self.stable_s
                    self._backoff[name] = (min(self.max_backoff_s, 2 * self._backoff.get(name, self.backoff_s))
                                           if quick else self.backoff_s)
                if now < self._dead_since[name] + self._backoff[name] or self._stop.is_set():
                    continue
                event: dict[str, object] = {"name": name, "dead_at": self._dead_since[name]}
                try:
                    self._restart(name)
                except Exception as exc:  # noqa: BLE001 - a failed start is retried after a longer backoff
                    event["error"] = f"{type(exc).__name__}: {exc}"
                self._started[name] = event["back_at"] = time.monotonic()
                del self._dead_since[name]
                self.events.append(event)
                print(f"supervisor: restarted {name}" + (f" (failed: {event['error']})" if "error" in event else ""),
                      file=sys.stderr, flush=True)


async def deploy_demo(scheduler: str, model_dir: Path, name: str = "demo", timeout: float = 180.0,  # noqa: ASYNC109
                      token: str = "", tls: ClientTls | None = None) -> str:
    """Creates the demo function (if absent) and waits until it is READY; with ``token`` (an
    operator's, the scheduler runs with admin_auth) it also makes an API key for the demo's
    tenant and returns it ("" otherwise). ``tls``: the cluster's ``client_tls()`` (None: plaintext)."""
    import functools

    from snapwake import errors
    from snapwake.grpcclient import call, channel
    from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

    spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name=name, image="builtin",
                                  model_dir=str(model_dir))
    async with channel(scheduler, tls, server_role="scheduler" if tls else "") as ch:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(ch)
        md = (("authorization", "Bearer " + token),) if token else None
        create, get = (functools.partial(stub.CreateFunction, metadata=md), functools.partial(stub.GetFunction, metadata=md))
        deadline = time.monotonic() + timeout
        fid = f"default/default/{name}"
        created = False
        while time.monotonic() < deadline:
            try:
                if not created:
                    await call(create, scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10)
                    created = True
                got = await call(get, scheduler_pb2.GetFunctionRequest(function_id=fid), timeout=10)
            except (errors.AlreadyExists, errors.Unavailable) as exc:
                created = created or isinstance(exc, errors.AlreadyExists)
                # Unavailable: a scheduler restarted on a kept etcd waits out the old
                # leader's election lease before it answers.
                await asyncio.sleep(0.5)
                continue
            state = got.function.state
            if state == types_pb2.FUNCTION_STATE_READY:
                if not token:
                    return ""
                made = await call(functools.partial(stub.CreateApiKey, metadata=md), scheduler_pb2.CreateApiKeyRequest(
                    tenant="default", description="make run: demo"), timeout=10)
                return str(made.secret)
            if state == types_pb2.FUNCTION_STATE_FAILED:
                raise RuntimeError(f"demo function failed: {got.function.status_message}")
            await asyncio.sleep(0.5)
        raise TimeoutError(f"demo function not ready after {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make run", description=__doc__)
    parser.add_argument("--gateway-port", type=int, default=8000)
    parser.add_argument("--var-dir", type=Path, default=ROOT / "var")
    parser.add_argument("--restart", action="store_true",
                        help="restart a service that dies (with backoff) instead of stopping everything")
    opts = parser.parse_args(argv)
    from snapwake.log import setup

    setup("devcluster")
    var = opts.var_dir.resolve()
    # The demo model is written under the var dir, which --var-dir may move: it is a model root.
    config = ClusterConfig(var_dir=var, gateway_port=opts.gateway_port, admin_auth=True,
                           extra_args={"nodeagent": ["--model-roots", f"{var / 'models'},{ROOT / 'var' / 'models'}"]})
    # The model server's own tool writes the demo model (shared code imports no model server).
    model_dir = Path(subprocess.run([sys.executable, "-m", "modelserver.demo", str(config.var_dir / "models" / "demo"),
                                     "--seed", "0"], check=True, capture_output=True, text=True).stdout.strip())
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    with Cluster(config) as cluster:
        print("deploying the demo model (snapshot build and pre-warm) ...", flush=True)
        api_key = asyncio.run(deploy_demo(cluster.scheduler_address, model_dir, token=cluster.token_file.read_text().strip(),
                                          tls=cluster.client_tls()))
        if opts.restart:
            cluster.supervise()
        url = cluster.gateway_url
        print(f"\nSnapwake is up.\n  OpenAI base URL: {url}/v1\n  admin API (gRPC over TLS): {cluster.scheduler_address}"
              f" (CA {cluster.ca_path})\n"
              f"  dashboard: {url}/dashboard/\n  logs: {config.var_dir / 'logs'}\n"
              f"  operator token: export SNAPWAKE_TOKEN_FILE={cluster.token_file}  (snapwake token/apikey create)\n"
              f"  API key of tenant default (made now; more: snapwake apikey create TENANT): {api_key}\n\nTry:\n"
              f"  grpcurl -cacert {cluster.ca_path} {cluster.scheduler_address} list\n"
              f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' "
              f"-H 'Authorization: Bearer {api_key}' "
              f"-d '{{\"model\": \"demo\", \"stream\": true, \"messages\": [{{\"role\": \"user\", "
              f"\"content\": \"hello\"}}]}}'\n\nCtrl-C stops everything.", flush=True)
        try:
            while not stop[0]:
                time.sleep(0.5)
                dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
                if dead and not opts.restart:
                    print(f"service exited: {', '.join(dead)}; stopping", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
        print("\nstopping ...", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
