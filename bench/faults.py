"""``bench/faults``: the fault matrix. Parts of a running cluster die under a steady load; nothing
the clients sent may be lost.

The cluster (``snapwake.devcluster``) has redundancy where the design has it: three etcd members,
two schedulers (one leads through the etcd election), two nodes (nodeagent + blobstore each) and
two gateways. Its ``Supervisor`` restarts every process that dies (after a 0.5 s backoff,
doubled for a process that keeps dying), as systemd's ``Restart=always`` or a Kubernetes
restart policy would. The function is the built-in CPU model server with the tiny seeded random
demo model (``modelserver.demo``), two instances, in runc containers.

The load: ``workers`` threads, each sending one request after another (with a short pause)
through the real ``openai`` client with its retries off (``max_retries=0``), half of them
streamed, round-robin over the two gateways, as a client behind an L4 load balancer: a
connection the balancer cannot open at all (the gateway's port refuses) goes to the other
gateway; that is not a retry, since no gateway received anything. Every answer is greedy
(temperature 0) and checked against the text the same prompt got before any fault.

Faults, in turn (each in its own phase: from where the last one ended, through ``pre_s`` of
load, the fault and its recovery, until ``post_s`` after it): kill -9 of a gateway, of
the scheduler leader, of a nodeagent, of a blobstore, of an instance container (``runc kill
KILL``), of one etcd member (the raft leader); the blobstore's disk filled (a small tmpfs
under each blobstore dir, filled to ENOSPC for ``disk_full_s``); etcd stopped whole (every
member) for 10 s. Each request is counted once, in the phase it was sent in (those sent after
the last phase in ``after_last_phase``):

- ``served``: 200 and the expected text, with a finish reason;
- ``failed_clean``: an OpenAI-shaped error (``{"error": {"message", "type", ...}}``; 429/503
  carry Retry-After), before or in the stream;
- ``cut``: in flight on the killed component itself: a connection of the killed gateway (one
  open at the kill, or a pooled one used before its restart), or a stream of the killed instance;
- ``lost``: anything else: no answer, a malformed answer, or a wrong text. It must be 0.

``recovery_s``: from the fault until the killed part is back (restarted by the supervisor and
answering; for the instance, the function serving with as many instances as before) and a
request sent after that was served. ``gap_s``: the longest time without a served answer around
the fault.

    python -m bench.faults --out bench/results/faults.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai

from snapwake.devcluster import Cluster, ClusterConfig, Supervisor
from snapwake.testing import EtcdCluster, wait_for
from snapwake.v1 import scheduler_pb2, scheduler_pb2_grpc, types_pb2

FID = "default/default/demo"
PROMPTS = ("hello", "tell me about etcd", "what is a snapshot?", "count to five")
MAX_TOKENS = 12
SERVING = (types_pb2.INSTANCE_STATE_RUNNING, types_pb2.INSTANCE_STATE_IDLE)
ALL_FAULTS = ("gateway", "scheduler-leader", "nodeagent", "blobstore", "instance", "etcd-member",
              "blobstore-disk-full", "etcd-stop-10s")


# --- the load ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    sent: float
    done: float
    gateway: str
    stream: bool
    result: str
    """ok, wrong, api_error (OpenAI-shaped), stream_error (OpenAI-shaped error event mid-stream),
    connection (no answer), truncated (a stream that ended without a finish reason), malformed."""
    instance: str = ""
    status: int = 200
    rerouted: bool = False
    detail: str = ""


def _openai_error(exc: openai.APIStatusError) -> str:
    """'' when the error answer is OpenAI-shaped (and 429/503 carry Retry-After), else what is wrong."""
    try:
        body = exc.response.json()
    except ValueError:
        return f"not JSON: {exc.response.text[:200]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return f"not an OpenAI error: {str(body)[:200]}"
    if exc.status_code in (429, 503) and not exc.response.headers.get("retry-after"):
        return f"{exc.status_code} without Retry-After"
    return ""


class Load:
    """Requests one after another on ``workers`` threads, round-robin over the gateways."""

    def __init__(self, cluster: Cluster, expected: dict[str, str], workers: int = 4, pause_s: float = 0.1,
                 timeout_s: float = 90.0) -> None:
        self.cluster, self.expected = cluster, expected
        self.gateways = cluster.names("gateway")
        self.pause_s, self.timeout_s = pause_s, timeout_s
        self.outcomes: list[Outcome] = []
        self._sent: list[float] = []
        self._turn = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]

    def _client(self, gateway: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://{self.cluster.address(gateway)}/v1", api_key="unused",
                             max_retries=0, timeout=self.timeout_s)

    def _run(self, worker: int) -> None:
        clients = {g: self._client(g) for g in self.gateways}
        while not self._stop.is_set():
            n = next(self._turn)
            prompt, stream = PROMPTS[n % len(PROMPTS)], n % 2 == 1
            gateway = self.gateways[n % len(self.gateways)]
            sent = time.monotonic()
            self._sent.append(sent)
            out = self.one(clients[gateway], prompt, stream)
            if out.result == "connection" and out.detail.startswith("ConnectError"):
                # The balancer could not connect at all: nothing was received; the other gateway.
                gateway = self.gateways[(n + 1) % len(self.gateways)]
                out = self.one(clients[gateway], prompt, stream)
                out.rerouted = True
            out.sent, out.gateway = sent, gateway
            self.outcomes.append(out)
            self._stop.wait(self.pause_s)

    def one(self, client: openai.OpenAI, prompt: str, stream: bool) -> Outcome:
        out = Outcome(0.0, 0.0, "", stream, "ok")
        text, reason = "", None
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="demo", messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
                temperature=0, stream=stream)
            out.instance = raw.headers.get("x-snapwake-instance", "")
            parsed: Any = raw.parse()
            if stream:
                for chunk in parsed:
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        reason = chunk.choices[0].finish_reason or reason
            else:
                text = parsed.choices[0].message.content or ""
                reason = parsed.choices[0].finish_reason
        except openai.APIStatusError as exc:
            out.status, problem = exc.status_code, _openai_error(exc)
            out.result, out.detail = ("malformed", problem) if problem else ("api_error", exc.message[:200])
        except (openai.APIConnectionError, httpx.TransportError) as exc:  # no answer (timeouts included)
            cause = exc.__cause__ or exc
            out.result, out.detail = "connection", f"{type(cause).__name__}: {cause}"[:200]
        except openai.APIError as exc:  # an error event in the stream (the openai client raises it)
            shaped = isinstance(exc.body, dict) and isinstance(exc.body.get("message"), str)
            out.result, out.detail = ("stream_error" if shaped else "malformed"), exc.message[:200]
        except Exception as exc:  # noqa: BLE001 - anything else is a malformed answer
            out.result, out.detail = "malformed", f"{type(exc).__name__}: {exc}"[:200]
        else:
            if reason not in ("stop", "length"):
                out.result, out.detail = "truncated", f"no finish reason after {text!r}"
            elif text != self.expected[prompt]:
                out.result, out.detail = "wrong", f"{text!r} != {self.expected[prompt]!r}"
        out.done = time.monotonic()
        return out

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 30)

    def sent_between(self, begin: float, end: float) -> int:
        return sum(1 for s in list(self._sent) if begin <= s < end)

    def served_after(self, t: float) -> bool:
        return any(o.result == "ok" and o.sent >= t for o in list(self.outcomes))


# --- the cluster ------------------------------------------------------------------------------

_ADMIN_CHANNELS: dict[tuple[int, str], grpc.Channel] = {}


def _admin(cluster: Cluster, name: str) -> scheduler_pb2_grpc.SchedulerServiceStub:
    """The admin API of the scheduler ``name`` (server-authenticated TLS, as the CLI reaches it)."""
    key = (id(cluster), name)
    if key not in _ADMIN_CHANNELS:
        _ADMIN_CHANNELS[key] = cluster.admin_channel(name)
    return scheduler_pb2_grpc.SchedulerServiceStub(_ADMIN_CHANNELS[key])


def leader(cluster: Cluster) -> str | None:
    """The scheduler process that answers admin calls; followers answer UNAVAILABLE."""
    for name in cluster.names("scheduler"):
        if name not in cluster.procs or cluster.procs[name].poll() is not None:
            continue
        with contextlib.suppress(grpc.RpcError):
            _admin(cluster, name).ListNodes(scheduler_pb2.ListNodesRequest(), timeout=3)
            return name
    return None


def admin(cluster: Cluster, timeout: float = 60) -> scheduler_pb2_grpc.SchedulerServiceStub:
    wait_for(lambda: leader(cluster) is not None, timeout, "a scheduler leader", interval=0.2)
    return _admin(cluster, leader(cluster))  # type: ignore[arg-type]


def serving(cluster: Cluster) -> list[types_pb2.Instance]:
    got = admin(cluster).ListInstances(scheduler_pb2.ListInstancesRequest(function_id=FID), timeout=5).instances
    return [i for i in got if i.state in SERVING]


def agent_of(cluster: Cluster, node: str) -> str:
    return next(a for a in cluster.names("nodeagent") if cluster.node_name(a) == node)


def runc_root(cluster: Cluster, agent: str) -> str:
    return str(cluster.state_dir(agent) / "runc")


def containers(cluster: Cluster, agent: str) -> list[dict[str, Any]]:
    out = subprocess.run(["runc", "--root", runc_root(cluster, agent), "list", "-f", "json"],
                         capture_output=True, text=True, timeout=20)
    return json.loads(out.stdout or "null") or []


def kill_all_containers(cluster: Cluster) -> None:
    for agent in cluster.names("nodeagent"):
        for c in containers(cluster, agent):
            subprocess.run(["runc", "--root", runc_root(cluster, agent), "delete", "--force", c["id"]],
                           capture_output=True, timeout=20)


def etcd_leader(etcd: EtcdCluster) -> int:
    out = subprocess.run([*etcd.etcdctl(), "endpoint", "status", "-w", "json"],
                         capture_output=True, text=True, timeout=20).stdout
    for status in json.loads(out or "[]"):
        if status["Status"]["leader"] == status["Status"]["header"]["member_id"]:
            return etcd.endpoints.index(status["Endpoint"].removeprefix("https://").removeprefix("http://"))
    return 0


@dataclass
class Setup:
    cluster: Cluster
    etcd: EtcdCluster | None
    supervisor: Supervisor
    var: Path
    tmpfs: list[Path] = field(default_factory=list)
    min_instances: int = 2

    def healthy(self) -> bool:
        procs_up = all(p.poll() is None for p in self.cluster.procs.values())
        members_up = self.etcd is None or all(m.proc is not None and m.proc.poll() is None for m in self.etcd.members)
        return procs_up and members_up and leader(self.cluster) is not None and \
            len(serving(self.cluster)) >= self.min_instances


def _mount_tmpfs(path: Path, size_mib: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
                          capture_output=True, timeout=20)
    return done.returncode == 0


@contextlib.contextmanager
def cluster_up(*, etcd_members: int = 3, nodes: int = 2, snapshots: bool = True,
               disk_tmpfs_mib: int = 0, extra_args: dict[str, list[str]] | None = None,
               keep_on_error: bool = True) -> Iterator[Setup]:
    """The cluster, supervised, with the demo function deployed and its instances serving."""
    from modelserver.demo import make_demo_model

    # Short: control and handover sockets live under it and Unix socket paths stay < 108 chars.
    var = Path(tempfile.mkdtemp(prefix="swfault-", dir="/tmp"))
    model_dir = make_demo_model(var / "models" / "demo", seed=0)
    extra_args = {k: list(v) for k, v in (extra_args or {}).items()}
    # A container start on a loaded two-core machine can take minutes (Python and torch imports).
    extra_args.setdefault("nodeagent", []).extend(["--model-roots", str(var / "models"), "--start-timeout", "300"])
    etcd = EtcdCluster(var / "etcd", size=etcd_members, pki=var / "pki") if etcd_members > 1 else None
    tmpfs: list[Path] = []
    if disk_tmpfs_mib:
        for blob in ("blobstore", *(f"blobstore-{i}" for i in range(1, nodes))):
            for d in ("d0", "d1"):
                if _mount_tmpfs(var / blob / d, disk_tmpfs_mib):
                    tmpfs.append(var / blob / d)
    config = ClusterConfig(var_dir=var, gateway_port=0, scheduler_port=0, nodeagent_port=0, blobstore_port=0,
                           etcd_port=0, node_name="fz", schedulers=2, nodes=nodes, gateways=2,
                           etcd_endpoints=etcd.endpoints if etcd else (), extra_args=extra_args)
    cluster = Cluster(config)
    ok = False
    try:
        if etcd is not None:
            etcd.start()
        cluster.start()
        members = {f"etcd-m{i}": m for i, m in enumerate(etcd.members)} if etcd else None
        supervisor = cluster.supervise(members)
        spec = types_pb2.FunctionSpec(tenant="default", namespace="default", name="demo", image="builtin",
                                      model_dir=str(model_dir))
        spec.policy.min_instances, spec.policy.max_instances = 2, 3
        # No standbys: four model servers starting at once on two shared cores miss any start timeout.
        spec.policy.standby_per_node = 0
        if not snapshots:
            spec.policy.snapshot_mode = types_pb2.SNAPSHOT_MODE_NONE
        spec.policy.queue_timeout.FromSeconds(60)
        spec.policy.start_timeout.FromSeconds(300)  # starts and snapshot builds on a loaded machine
        admin(cluster).CreateFunction(scheduler_pb2.CreateFunctionRequest(spec=spec), timeout=10)
        setup = Setup(cluster, etcd, supervisor, var, tmpfs)

        failed: list[str] = []

        def ready() -> bool:
            fn = admin(cluster).GetFunction(scheduler_pb2.GetFunctionRequest(function_id=FID), timeout=5).function
            if fn.state == types_pb2.FUNCTION_STATE_FAILED:
                failed.append(fn.status_message)
                return True
            return fn.state == types_pb2.FUNCTION_STATE_READY and setup.healthy()

        wait_for(ready, 600, f"{FID} READY with 2 instances serving", interval=0.5)
        if failed:
            raise RuntimeError(f"demo failed to deploy: {failed[0]}")
        yield setup
        ok = True
    finally:
        cluster.stop()
        kill_all_containers(cluster)  # a killed agent leaves its containers behind
        if etcd is not None:
            etcd.stop()
        for path in tmpfs:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=20)
        if ok or not keep_on_error:
            shutil.rmtree(var, ignore_errors=True)
        else:
            print(f"fault matrix cluster kept for its logs: {var}/logs")


def expected_answers(cluster: Cluster) -> dict[str, str]:
    """Each prompt's greedy answer, asked once on an idle cluster (streamed and not: they agree)."""
    client = openai.OpenAI(base_url=cluster.gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = {}
    for prompt in PROMPTS:
        msgs: Any = [{"role": "user", "content": prompt}]
        got = client.chat.completions.create(model="demo", messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
        chunks: Any = client.chat.completions.create(model="demo", messages=msgs, max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        text = got.choices[0].message.content or ""
        if not text or streamed != text:
            raise RuntimeError(f"{prompt!r}: streamed {streamed!r}, whole {text!r}")
        out[prompt] = text
    return out


# --- the faults -------------------------------------------------------------------------------

@dataclass
class Injected:
    """What a fault killed, when, and how to tell it is back."""

    at: float
    target: str
    gateways: set[str] = field(default_factory=set)
    instances: set[str] = field(default_factory=set)
    back: Callable[[], bool] = lambda: True
    note: str = ""


def _restarted(setup: Setup, name: str, after: float) -> Callable[[], bool]:
    def back() -> bool:
        return any(e["name"] == name and float(e["dead_at"]) >= after - 1 and "error" not in e  # type: ignore[arg-type]
                   for e in setup.supervisor.events)
    return back


def _recent_instance(load: Load, setup: Setup) -> types_pb2.Instance:
    live = {i.id: i for i in serving(setup.cluster)}
    for o in reversed(list(load.outcomes)):
        if o.instance in live:
            return live[o.instance]
    return next(iter(live.values()))


def inject(fault: str, setup: Setup, load: Load, disk_full_s: float) -> Injected:
    c = setup.cluster
    if fault == "gateway":
        at = time.monotonic()
        c.kill("gateway")
        return Injected(at, "gateway", gateways={"gateway"}, back=_restarted(setup, "gateway", at))
    if fault == "scheduler-leader":
        name = leader(c) or "scheduler"
        at = time.monotonic()
        c.kill(name)
        restarted = _restarted(setup, name, at)
        return Injected(at, name, back=lambda: restarted() and leader(c) is not None)
    if fault in ("nodeagent", "blobstore"):
        node = _recent_instance(load, setup).node  # the node serving the load
        name = agent_of(c, node).replace("nodeagent", fault)
        at = time.monotonic()
        c.kill(name)
        restarted = _restarted(setup, name, at)
        return Injected(at, name, back=lambda: restarted() and setup.healthy())
    if fault == "instance":
        inst = _recent_instance(load, setup)
        agent = agent_of(c, inst.node)
        (cid,) = [x["id"] for x in containers(c, agent) if inst.id in x["id"] or inst.id in x.get("bundle", "")]
        before = len(serving(c))
        at = time.monotonic()
        subprocess.run(["runc", "--root", runc_root(c, agent), "kill", cid, "KILL"], check=True, timeout=20)
        return Injected(at, f"instance {inst.id} on {inst.node}", instances={inst.id},
                        back=lambda: len([i for i in serving(c) if i.id != inst.id]) >= before)
    if fault == "etcd-member":
        assert setup.etcd is not None, "etcd-member needs an etcd cluster"
        index = etcd_leader(setup.etcd)
        at = time.monotonic()
        setup.etcd.members[index].kill()
        restarted = _restarted(setup, f"etcd-m{index}", at)
        return Injected(at, f"etcd-m{index} (raft leader)", back=restarted)
    if fault == "blobstore-disk-full":
        if not setup.tmpfs:
            raise RuntimeError("no tmpfs under the blobstore dirs (mount needs root)")
        at = time.monotonic()
        fillers = []
        for path in setup.tmpfs:
            filler = path / "fill.bin"
            with open(filler, "wb") as f:  # to ENOSPC
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * (1 << 20))
            fillers.append(filler)
        free = [shutil.disk_usage(p).free for p in setup.tmpfs]
        time.sleep(disk_full_s)
        for filler in fillers:
            filler.unlink()
        return Injected(at, f"{len(fillers)} blobstore dirs filled for {disk_full_s:.0f}s (free bytes {free})",
                        back=setup.healthy)
    if fault == "etcd-stop-10s":
        members = setup.etcd.members if setup.etcd else [c.etcd]
        names = [f"etcd-m{i}" for i in range(len(members))] if setup.etcd else ["etcd"]
        setup.supervisor.hold(*names)
        at = time.monotonic()
        for m in members:
            m.stop()
        time.sleep(10)
        for m in members:
            m.spawn()
        for m in members:
            m.wait_ready(30)
        setup.supervisor.release(*names)
        return Injected(at, "every etcd member stopped for 10 s", back=setup.healthy)
    raise ValueError(f"unknown fault {fault!r}; known: {', '.join(ALL_FAULTS)}")


def classify(o: Outcome, fault: Injected | None, back_at: float) -> str:
    """served / failed_clean / cut / lost (module docstring)."""
    if o.result == "ok":
        return "served"
    if o.result in ("api_error", "stream_error"):
        if fault is not None and o.result == "stream_error" and o.instance in fault.instances:
            return "cut"
        return "failed_clean"
    on_killed_gateway = fault is not None and o.gateway in fault.gateways and o.sent <= back_at \
        and o.done >= fault.at
    if o.result in ("connection", "truncated") and on_killed_gateway:
        return "cut"
    return "lost"


def run_fault(fault: str, setup: Setup, load: Load, *, begin: float, pre_s: float, post_s: float,
              recover_timeout_s: float, disk_full_s: float) -> dict[str, Any]:
    """One phase: from ``begin`` (where the last one ended, so every request counts somewhere)
    until ``post_s`` after the recovery."""
    wait_for(setup.healthy, 240, f"a healthy cluster before {fault}", interval=0.5)
    time.sleep(pre_s)
    error = ""
    try:
        injected: Injected | None = inject(fault, setup, load, disk_full_s)
    except Exception as exc:  # noqa: BLE001 - recorded; the matrix goes on
        injected, error = None, f"{type(exc).__name__}: {exc}"
    at = injected.at if injected else time.monotonic()
    back_at = recovered_at = float("nan")
    if injected is not None:
        try:
            wait_for(injected.back, recover_timeout_s, f"{fault} back", interval=0.2)
            back_at = time.monotonic()
            wait_for(lambda: load.served_after(back_at), 60, f"a request served after {fault}", interval=0.1)
            recovered_at = next(o.done for o in list(load.outcomes) if o.result == "ok" and o.sent >= back_at)
        except TimeoutError as exc:
            error = str(exc)
    time.sleep(post_s)
    end = time.monotonic()
    # Requests sent in this phase; the last ones may still be in flight (each ends by its timeout).
    in_phase = lambda: [o for o in list(load.outcomes) if begin <= o.sent < end]  # noqa: E731
    with contextlib.suppress(TimeoutError):  # cannot happen: every request has the client's timeout
        wait_for(lambda: len(in_phase()) >= load.sent_between(begin, end), load.timeout_s + 10, "the requests", 0.1)
    mine = in_phase()
    counts = {"sent": len(mine), "served": 0, "failed_clean": 0, "cut": 0, "lost": 0}
    examples: dict[str, list[str]] = {}
    for o in mine:
        kind = classify(o, injected, back_at if back_at == back_at else end)
        counts[kind] += 1
        if kind != "served" and len(examples.setdefault(kind, [])) < 3:
            examples[kind].append(f"+{o.sent - at:.2f}s {o.gateway} {'stream' if o.stream else 'whole'} "
                                  f"{o.result} {o.status} {o.instance}: {o.detail}")
    ok_times = sorted(o.done for o in mine if o.result == "ok")
    window = [t for t in ok_times if t >= at]
    gaps = [b - a for a, b in itertools.pairwise([max([t for t in ok_times if t < at], default=at), *window])]
    statuses: dict[str, int] = {}
    for o in mine:
        if o.result in ("api_error", "stream_error"):
            statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    return {
        "fault": fault, "target": injected.target if injected else "", "note": injected.note if injected else "",
        **counts, "rerouted": sum(o.rerouted for o in mine),
        "error_statuses": statuses,
        "recovery_s": round(recovered_at - at, 2) if recovered_at == recovered_at else None,
        "back_s": round(back_at - at, 2) if back_at == back_at else None,
        "gap_s": round(max(gaps, default=0.0), 2),
        "phase_s": round(end - begin, 1), "examples": examples, **({"error": error} if error else {}),
        "_end": end,
    }


def run_matrix(faults: tuple[str, ...] = ALL_FAULTS, *, etcd_members: int = 3, nodes: int = 2,
               snapshots: bool = True, workers: int = 4, pause_s: float = 0.1, pre_s: float = 4.0,
               post_s: float = 4.0, recover_timeout_s: float = 300.0, disk_full_s: float = 10.0,
               extra_args: dict[str, list[str]] | None = None) -> dict[str, Any]:
    began = time.monotonic()
    disk = 256 if "blobstore-disk-full" in faults else 0
    with cluster_up(etcd_members=etcd_members, nodes=nodes, snapshots=snapshots, disk_tmpfs_mib=disk,
                    extra_args=extra_args) as setup:
        setup_s = time.monotonic() - began
        expected = expected_answers(setup.cluster)
        rows: list[dict[str, Any]] = []
        mark = time.monotonic()
        with Load(setup.cluster, expected, workers=workers, pause_s=pause_s) as load:
            for fault in faults:
                rows.append(run_fault(fault, setup, load, begin=mark, pre_s=pre_s, post_s=post_s,
                                      recover_timeout_s=recover_timeout_s, disk_full_s=disk_full_s))
                mark = rows[-1].pop("_end")
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "examples"}), flush=True)
        # The few requests sent after the last phase, with no fault: any of them lost counts too.
        after = [classify(o, None, mark) for o in load.outcomes if o.sent >= mark]
        restarts = [{"name": e["name"], "down_s": round(float(e["back_at"]) - float(e["dead_at"]), 2),  # type: ignore[arg-type]
                     **({"error": e["error"]} if "error" in e else {})} for e in setup.supervisor.events]
    return {"faults": rows, "after_last_phase": {k: after.count(k) for k in ("served", "failed_clean", "lost")},
            "restarts": restarts, "setup_s": round(setup_s, 1),
            "cluster": {"etcd_members": etcd_members, "schedulers": 2, "nodes": nodes, "gateways": 2,
                        "instances": 2, "snapshots": ("arena snapshot built at deploy, no standbys (each start opens a handover socket on "
                                      "its node's blobstore)") if snapshots else "none",
                        "extra_args": extra_args or {}},
            "load": {"workers": workers, "pause_s": pause_s, "max_tokens": MAX_TOKENS, "prompts": list(PROMPTS),
                     "client": f"openai {openai.__version__}, max_retries=0, half streamed, round-robin over "
                               "two gateways (a refused connection goes to the other one)"},
            "supervisor": "snapwake.devcluster.Supervisor: restart on death, 0.5 s backoff doubled up to 8 s "
                          "for a process that dies within 30 s of its start"}


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/faults.json"))
    parser.add_argument("--faults", default=",".join(ALL_FAULTS), help="comma-separated, in order")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--pre-s", type=float, default=4.0)
    parser.add_argument("--post-s", type=float, default=4.0)
    opts = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the cluster and its containers are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    faults = tuple(f for f in opts.faults.split(",") if f)
    result = run_matrix(faults, workers=opts.workers, pre_s=opts.pre_s, post_s=opts.post_s)
    result["machine"] = (f"{platform.node()}: {os.cpu_count()} CPU cores shared with other users' jobs "
                         f"(load average {os.getloadavg()[0]:.1f} at the end), no GPU; {platform.platform()}")
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0 if all(r["lost"] == 0 and r["recovery_s"] is not None for r in result["faults"]) else 1


def table(result: dict[str, Any]) -> str:
    lines = ["| fault | sent | served | failed (clean) | cut | lost | recovery (s) | gap (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["faults"]:
        lines.append(f"| {r['fault']} | {r['sent']} | {r['served']} | {r['failed_clean']} | {r['cut']} | {r['lost']} "
                     f"| {r['recovery_s']} | {r['gap_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
