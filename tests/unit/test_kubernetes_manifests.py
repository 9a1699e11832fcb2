"""deploy/kubernetes: the base and both overlays render, validate against the Kubernetes schemas,
and name only images, ports, addresses, Secrets and config keys that exist.

No cluster runs here, so this is what stands behind the manifests: they are schema-checked
(``kubernetes-validate``, strict: an unknown field fails) and cross-checked with the code, not
run. Rendering is ``kustomize_lite`` (see there why), compared with ``kubectl kustomize`` where
kubectl is installed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from kustomize_lite import Doc, key, render, split_image

from services.blobstore.config import BlobstoreConfig
from services.gateway.config import GatewayConfig
from services.nodeagent.config import NodeAgentConfig
from services.scheduler.config import SchedulerConfig
from snapwake import credentials
from snapwake.config import ConfigError, load, parse_address

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
SECRETS_EXAMPLE = KUBE / "overlays" / "production" / "secrets.example.yaml"
TARGETS = ("base", "overlays/dev", "overlays/production")
# The newest Kubernetes whose schemas kubernetes-validate ships.
KUBERNETES_VERSION = "1.37.0"
CONFIGS: dict[str, type] = {"gateway": GatewayConfig, "scheduler": SchedulerConfig,
                            "nodeagent": NodeAgentConfig, "blobstore": BlobstoreConfig}
# Config fields that hold the address of another process (snapwake.config.parse_address).
ADDRESS_FIELDS = ("etcd", "scheduler", "blobstore", "advertise", "peers")
# NodeAgentConfig.validate checks that these name files in the image, which this machine need not have
# (the tls_* files and the admin credentials are the mounted Secrets).
IMAGE_FILE_KEYS = ("repo_root", "seccomp_profile", "repo_root/python_path/python", "tls_ca", "tls_cert", "tls_key",
                   "admin_token_files", "admin_token_file", "api_key_secret_file")
# What the downward API would give, for loading configs that use it.
FIELD_REFS = {"metadata.name": "{workload}-0", "status.podIP": "10.0.0.7", "spec.nodeName": "gpu-node-1"}
# Variables that are not Snapwake config keys but that the platform reads.
OTHER_ENV = re.compile(r"^(NVIDIA_VISIBLE_DEVICES|NVIDIA_DRIVER_CAPABILITIES|OTEL_[A-Z_]+)$")
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
_MODULE = re.compile(r"\bpython -m services\.(\w+)")


@pytest.fixture(scope="module", autouse=True)
def _schemas_parsed_once() -> Iterator[None]:
    """kubernetes-validate parses its multi-megabyte schema files on every call: parse each once."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes_validate.utils, "schema_contents",
                      functools.cache(kubernetes_validate.utils.schema_contents))
        yield


@functools.cache
def rendered(target: str) -> tuple[Doc, ...]:
    return tuple(render(KUBE / target))


def secrets_example() -> list[Doc]:
    return [d for d in yaml.safe_load_all(SECRETS_EXAMPLE.read_text()) if d]


@dataclass(frozen=True)
class Workload:
    """A Deployment, StatefulSet or DaemonSet, seen as the pods it makes."""

    doc: Doc

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.doc["metadata"]["namespace"])

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.doc["spec"]["template"]["metadata"]["labels"])

    @property
    def pod(self) -> dict[str, Any]:
        return dict(self.doc["spec"]["template"]["spec"])

    @property
    def containers(self) -> list[dict[str, Any]]:
        return list(self.pod["containers"])

    def ports(self) -> set[int]:
        return {p["containerPort"] for c in self.containers for p in c.get("ports", ())}


def workloads(docs: tuple[Doc, ...]) -> list[Workload]:
    return [Workload(d) for d in docs if d["kind"] in _WORKLOADS]


def snapwake_containers(docs: tuple[Doc, ...]) -> Iterator[tuple[Workload, dict[str, Any], str]]:
    """(workload, container, service) for every container that runs ``python -m services.X``."""
    for w in workloads(docs):
        for c in w.containers:
            found = _MODULE.findall(" ".join([*c.get("command", ()), *c.get("args", ())]))
            if found:
                assert len(found) == 1, f"{w.name}/{c['name']}: runs {found}"
                yield w, c, found[0]


def env_of(w: Workload, c: dict[str, Any], docs: tuple[Doc, ...]) -> dict[str, str]:
    """The container's variables as the kubelet would set them: $(NAME) expanded from earlier
    entries only, the downward API from FIELD_REFS, Secrets from the render or the example."""
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): s.get("stringData", {})
               for s in [*docs, *secrets_example()] if s["kind"] == "Secret"}
    env: dict[str, str] = {}
    for var in c.get("env", ()):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                      lambda m: env.get(m[1], m[0]), str(var["value"]))
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = FIELD_REFS[var["valueFrom"]["fieldRef"]["fieldPath"]].format(workload=w.name)
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[(w.namespace, ref["name"])][ref["key"]]
    return env


def script_exports(c: dict[str, Any]) -> set[str]:
    """SNAPWAKE_* variables a shell wrapper in the command sets."""
    return set(re.findall(r"export (SNAPWAKE_[A-Z_]+)=", " ".join(c.get("command", ()))))


def load_config(service: str, env: dict[str, str]) -> Any:
    """The service's config from ``env`` through ``snapwake.config.load``; every problem fails
    the test except those of IMAGE_FILE_KEYS."""
    base = CONFIGS[service]

    class Checked(base):  # type: ignore[valid-type,misc]
        def validate(self) -> list[str]:
            return [p for p in super().validate() if p.split(":")[0] not in IMAGE_FILE_KEYS]

    try:
        return load(Checked, argv=[], env=env)
    except ConfigError as exc:
        pytest.fail(f"{service}: {exc}")


# --- rendering and schemas --------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders_as_kustomize_does(target: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: kustomize_lite's rendering is not cross-checked")
    done = subprocess.run([kubectl, "kustomize", str(KUBE / target)], capture_output=True, text=True,
                          timeout=60, check=True)
    real = {key(d): d for d in yaml.safe_load_all(done.stdout) if d}
    mine = {key(d): d for d in rendered(target)}
    assert mine.keys() == real.keys()
    for k, doc in mine.items():
        assert doc == real[k], k


@pytest.mark.parametrize("target", [*TARGETS, "secrets.example"])
def test_every_document_validates_against_the_schemas(target: str) -> None:
    docs = secrets_example() if target == "secrets.example" else rendered(target)
    assert docs
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{key(doc)}: {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not problems


@pytest.mark.parametrize("target", TARGETS)
def test_every_namespaced_object_is_in_a_rendered_namespace(target: str) -> None:
    docs = rendered(target)
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    assert namespaces == {"snapwake", "snapwake-node"}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") in namespaces, key(doc)


# --- images and commands ----------------------------------------------------------------------


_SUBST = re.compile(r"\$\{(\w+):?-([^}]*)\}")


def compose_images() -> tuple[set[str], set[str]]:
    """(names of images compose builds, image:tag of those it pulls)."""
    built, pulled = set(), set()
    for section in yaml.safe_load(COMPOSE.read_text()).values():
        for svc in (section or {}).values() if isinstance(section, dict) else ():
            if isinstance(svc, dict) and "image" in svc:
                image = _SUBST.sub(lambda m: m.group(2), svc["image"])  # ${VAR:-default}: the default
                (built.add(split_image(image)[0]) if "build" in svc else pulled.add(image))
    return built, pulled


@pytest.mark.parametrize("target", TARGETS)
def test_images_are_the_ones_compose_builds_or_pins(target: str) -> None:
    built, pulled = compose_images()
    assert "snapwake/services" in built and any("etcd" in p for p in pulled)
    for w in workloads(rendered(target)):
        for c in w.containers:
            name, tag = split_image(c["image"])
            ours = any(name == b or name.endswith("/" + b) for b in built)
            assert ours or c["image"] in pulled, f"{w.name}/{c['name']}: {c['image']} is not in {COMPOSE}"
            assert tag, f"{w.name}/{c['name']}: {c['image']} has no tag"


@pytest.mark.parametrize("target", TARGETS)
def test_every_snapwake_container_runs_a_service_module(target: str) -> None:
    found = {service for _, _, service in snapwake_containers(rendered(target))}
    assert found == set(CONFIGS)
    for service in found:
        assert importlib.util.find_spec(f"services.{service}.__main__") is not None, service


# --- config keys, ports and addresses ---------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_key_exists_and_loads(target: str) -> None:
    docs = rendered(target)
    for w, c, service in snapwake_containers(docs):
        fields = {f.name for f in dataclasses.fields(CONFIGS[service])}
        env = env_of(w, c, docs)
        helpers = {m for v in c.get("env", ()) for m in re.findall(r"\$\(([A-Za-z_]\w*)\)", str(v.get("value", "")))}
        for name in [*env, *script_exports(c)]:
            if name.startswith("SNAPWAKE_"):
                assert name.removeprefix("SNAPWAKE_").lower() in fields, f"{w.name}/{c['name']}: {name}"
            else:
                assert OTHER_ENV.match(name) or name in helpers, f"{w.name}/{c['name']}: {name} is read by nothing"
        flags = [a for a in [*c.get("command", ()), *c.get("args", ())] if a.startswith("--")]
        for flag in flags:
            assert flag[2:].split("=")[0].replace("-", "_") in fields, f"{w.name}/{c['name']}: {flag}"
        load_config(service, env)


@pytest.mark.parametrize("target", TARGETS)
def test_env_references_name_earlier_variables(target: str) -> None:
    # The kubelet expands $(NAME) only from variables listed before; an overlay's patch moves the
    # variables it names to the front (kustomize's merge order), which can break this.
    for w in workloads(rendered(target)):
        for c in w.containers:
            seen: set[str] = set()
            for var in c.get("env", ()):
                for ref in re.findall(r"\$\(([A-Za-z_]\w*)\)", str(var.get("value", ""))):
                    assert ref in seen, f"{w.name}/{c['name']}: {var['name']} uses $({ref}) before it is set"
                seen.add(var["name"])


@pytest.mark.parametrize("target", TARGETS)
def test_container_ports_are_the_ports_the_config_listens_on(target: str) -> None:
    docs = rendered(target)
    for w, c, service in snapwake_containers(docs):
        config = load_config(service, env_of(w, c, docs))
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        listen = parse_address(config.listen)[1]
        assert named.pop("grpc" if service != "gateway" else "http") == listen, f"{w.name}/{c['name']}"
        if getattr(config, "metrics_port", 0):
            assert named.pop("metrics") == config.metrics_port, f"{w.name}/{c['name']}"
        for name, setting in (("admin", "admin_listen"), ("health", "health_listen")):
            if getattr(config, setting, ""):
                assert named.pop(name) == parse_address(getattr(config, setting))[1], f"{w.name}/{c['name']}"
        assert not named, f"{w.name}/{c['name']}: ports nothing listens on: {named}"
        for probe in ("readinessProbe", "livenessProbe"):
            port = c[probe].get("grpc", c[probe].get("httpGet", {})).get("port")
            health = parse_address(config.health_listen)[1] if getattr(config, "health_listen", "") else None
            # With TLS the probes (no TLS) go to the plaintext health port.
            assert port in ((health, "health") if health else (listen, "grpc", "http")), f"{w.name}/{c['name']}: {probe} on {port}"


def _resolve(host: str, port: int, own: Workload, docs: tuple[Doc, ...]) -> Workload:
    """The workload an address reaches: loopback (its own pod), its own pod IP, a Service, or a
    StatefulSet pod by its headless Service's DNS name."""
    if host in ("127.0.0.1", FIELD_REFS["status.podIP"]):
        assert port in own.ports(), f"{own.name}: nothing in the pod listens on {port}"
        return own
    parts = host.split(".")
    assert parts[-1] == "svc" and len(parts) in (3, 4), f"{host}: not <service>.<namespace>.svc"
    service_name, namespace = parts[-3], parts[-2]
    (service,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == service_name
                  and d["metadata"]["namespace"] == namespace]
    assert port in {p["port"] for p in service["spec"]["ports"]}, f"{host}: Service has no port {port}"
    (target,) = [w for w in workloads(docs) if w.namespace == namespace
                 and service["spec"]["selector"].items() <= w.labels.items()]
    if len(parts) == 4:
        pod, _, ordinal = parts[0].rpartition("-")
        assert service["spec"].get("clusterIP") == "None" and target.doc["kind"] == "StatefulSet", host
        assert pod == target.name and target.doc["spec"]["serviceName"] == service_name, host
        assert int(ordinal) < target.doc["spec"]["replicas"], f"{host}: no such replica"
    return target


@pytest.mark.parametrize("target", TARGETS)
def test_addresses_reach_the_component_that_serves_them(target: str) -> None:
    docs = rendered(target)
    expected = {"etcd": "etcd", "scheduler": "scheduler", "blobstore": "node", "advertise": None, "peers": "node"}
    for w, c, service in snapwake_containers(docs):
        config = load_config(service, env_of(w, c, docs))
        for field in ADDRESS_FIELDS:
            value = getattr(config, field, None)
            explicit = f"SNAPWAKE_{field.upper()}" in {v["name"] for v in c.get("env", ())}
            if not value or not explicit:
                continue
            for address in (value,) if isinstance(value, str) else value:
                reached = _resolve(*parse_address(address), w, docs)
                want = expected[field] or w.labels["app.kubernetes.io/component"]
                assert reached.labels["app.kubernetes.io/component"] == want, f"{w.name}: {field}={address}"
    # The gateway lists every scheduler replica: it finds the leader by asking each.
    (scheduler,) = [w for w in workloads(docs) if w.name == "scheduler"]
    (gateway,) = [w for w in workloads(docs) if w.name == "gateway"]
    addresses = load_config("gateway", env_of(gateway, gateway.containers[0], docs)).scheduler
    assert len(set(addresses)) == scheduler.doc["spec"]["replicas"] == 2


@pytest.mark.parametrize("target", TARGETS)
def test_etcd_initial_cluster_lists_every_replica(target: str) -> None:
    (etcd,) = [w for w in workloads(rendered(target)) if w.name == "etcd"]
    env = env_of(etcd, etcd.containers[0], rendered(target))
    members = [m.partition("=")[0] for m in env["ETCD_INITIAL_CLUSTER"].split(",")]
    assert members == [f"etcd-{i}" for i in range(etcd.doc["spec"]["replicas"])]
    assert etcd.doc["spec"]["podManagementPolicy"] == "Parallel"  # no member is Ready alone
    for url_key, port in (("ETCD_LISTEN_CLIENT_URLS", 2379), ("ETCD_LISTEN_PEER_URLS", 2380)):
        assert env[url_key].endswith(f":{port}") and port in etcd.ports()


# --- selectors, Secrets -----------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_selectors_and_references_find_their_objects(target: str) -> None:
    docs = rendered(target)
    loads = workloads(docs)
    for w in loads:
        assert w.doc["spec"]["selector"]["matchLabels"].items() <= w.labels.items(), w.name
        if w.doc["kind"] == "StatefulSet":
            assert ("v1", "Service", w.namespace, w.doc["spec"]["serviceName"]) in {key(d) for d in docs}
    for doc in docs:
        ns = doc["metadata"].get("namespace")
        if doc["kind"] == "Service":
            hits = [w for w in loads if w.namespace == ns and doc["spec"]["selector"].items() <= w.labels.items()]
            assert len(hits) == 1, key(doc)
            names = {p["name"] for c in hits[0].containers for p in c.get("ports", ())}
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= names, key(doc)
        elif doc["kind"] == "PodDisruptionBudget":
            match = doc["spec"]["selector"]["matchLabels"].items()
            assert any(w.namespace == ns and match <= w.labels.items() for w in loads), key(doc)
        elif doc["kind"] == "HorizontalPodAutoscaler":
            ref = doc["spec"]["scaleTargetRef"]
            assert (ref["apiVersion"], ref["kind"], ns, ref["name"]) in {key(d) for d in docs}, key(doc)


def _secret_refs(w: Workload) -> Iterator[tuple[str, bool]]:
    """(Secret name, optional) of every Secret the pod uses."""
    for c in w.containers:
        for var in c.get("env", ()):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"], bool(ref.get("optional", False))
    for volume in w.pod.get("volumes", ()):
        if "secret" in volume:
            yield volume["secret"]["secretName"], bool(volume["secret"].get("optional", False))


@pytest.mark.parametrize("target", TARGETS)
def test_required_secrets_exist_and_the_example_lists_every_secret(target: str) -> None:
    docs = rendered(target)
    rendered_secrets = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "Secret"}
    example = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in secrets_example()}
    used = {(w.namespace, name): optional for w in workloads(docs) for name, optional in _secret_refs(w)}
    for ref, optional in used.items():
        if not optional:
            assert ref in rendered_secrets | (example if target != "overlays/dev" else set()), ref
    assert example == set(used), "secrets.example.yaml must list exactly the Secrets the pods use"
    assert not any(d["kind"] == "Secret" for d in rendered("overlays/production")), "no secrets in git"


# --- network policies -------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is understood here: {selector}"
    return dict(selector.get("matchLabels", {})).items() <= labels.items()


def _peer(peer: dict[str, Any], policy_ns: str, pod: Workload, ns_labels: dict[str, dict[str, str]]) -> bool:
    if "ipBlock" in peer:
        return peer["ipBlock"]["cidr"] == "0.0.0.0/0"  # these pods' IPs are in it too
    in_ns = (_selects(peer["namespaceSelector"], ns_labels[pod.namespace]) if "namespaceSelector" in peer
             else pod.namespace == policy_ns)
    return in_ns and _selects(peer.get("podSelector", {}), pod.labels)


def _port(rule: dict[str, Any], port: int) -> bool:
    return not rule.get("ports") or any(
        p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"])


def allowed(docs: tuple[Doc, ...], src: Workload, dst: Workload, port: int) -> bool:
    """Whether the NetworkPolicies let ``src`` open a TCP connection to ``dst`` on ``port``."""
    # The API server gives every namespace a kubernetes.io/metadata.name label of its name.
    ns_labels = {d["metadata"]["name"]: {**d["metadata"].get("labels", {}), "kubernetes.io/metadata.name": d["metadata"]["name"]}
                 for d in docs if d["kind"] == "Namespace"}
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]

    def side(pod: Workload, other: Workload, kind: str, peers: str) -> bool:
        mine = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                and kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod.labels)]
        rules = [r for p in mine for r in p["spec"].get(kind.lower(), ())
                 if _port(r, port) and (peers not in r or any(
                     _peer(x, p["metadata"]["namespace"], other, ns_labels) for x in r[peers]))]
        return not mine or bool(rules)

    return side(src, dst, "Egress", "to") and side(dst, src, "Ingress", "from")


# (from, to, port): every path the design uses, then paths it must not open.
OPEN = [("gateway", "scheduler", 7000), ("gateway", "node", 40000), ("gateway", "node", 60999),
        ("scheduler", "node", 7070), ("scheduler", "etcd", 2379), ("node", "etcd", 2379),
        ("etcd", "etcd", 2380), ("node", "node", 7080)]
CLOSED = [("gateway", "etcd", 2379), ("gateway", "node", 7070), ("gateway", "node", 7080),
          ("gateway", "node", 39999), ("scheduler", "node", 7080), ("scheduler", "node", 45000),
          ("node", "scheduler", 7000), ("node", "gateway", 8000), ("node", "etcd", 2380),
          ("etcd", "scheduler", 7000), ("gateway", "scheduler", 7001), ("scheduler", "etcd", 2380), ("gateway", "gateway", 8000)]


@pytest.mark.parametrize("target", TARGETS)
def test_network_policies_open_the_design_paths_and_nothing_else(target: str) -> None:
    docs = rendered(target)
    by_component = {w.labels["app.kubernetes.io/component"]: w for w in workloads(docs)}
    for src, dst, port in OPEN:
        assert allowed(docs, by_component[src], by_component[dst], port), f"{src} -> {dst}:{port} is blocked"
    for src, dst, port in CLOSED:
        assert not allowed(docs, by_component[src], by_component[dst], port), f"{src} -> {dst}:{port} is open"
    for ns in ("snapwake", "snapwake-node"):
        assert ("networking.k8s.io/v1", "NetworkPolicy", ns, "default-deny") in {key(d) for d in docs}


@pytest.mark.parametrize("target", TARGETS)
def test_policy_ports_are_ports_that_pods_listen_on(target: str) -> None:
    docs = rendered(target)
    loads = workloads(docs)
    (node,) = [w for w in loads if w.name == "node"]
    sysctls = {s["name"]: s["value"] for s in node.pod["securityContext"]["sysctls"]}
    forwarders = tuple(int(p) for p in sysctls["net.ipv4.ip_local_port_range"].split())
    listening = set().union(*(w.ports() for w in loads))
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for rule in [*policy["spec"].get("ingress", ()), *policy["spec"].get("egress", ())]:
            for p in rule.get("ports", ()):
                if "endPort" in p:
                    assert (p["port"], p["endPort"]) == forwarders, key(policy)
                elif p["port"] not in (53, 443):  # DNS and registries, outside these manifests
                    assert p["port"] in listening, f"{key(policy)}: nothing listens on {p['port']}"


# --- the admin API's credentials -------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_the_admin_api_requires_a_token_and_the_gateway_holds_a_registered_one(target: str) -> None:
    docs = rendered(target)
    envs = {service: env_of(w, c, docs) for w, c, service in snapwake_containers(docs) if service in CONFIGS}
    scheduler, gateway = envs["scheduler"], envs["gateway"]
    assert scheduler["SNAPWAKE_ADMIN_AUTH"] == "true"
    registered = scheduler["SNAPWAKE_ADMIN_TOKEN_FILES"].split(",")
    assert gateway["SNAPWAKE_ADMIN_TOKEN_FILE"] in registered
    assert gateway["SNAPWAKE_API_KEY_SECRET_FILE"] == scheduler["SNAPWAKE_API_KEY_SECRET_FILE"]
    # The gateway's projection of the Secret leaves the operator's token out.
    gw = next(w for w in workloads(docs) if w.name == "gateway")
    access = next(v["secret"] for v in gw.pod["volumes"] if v.get("secret", {}).get("secretName") == "scheduler-access")
    assert {i["key"] for i in access["items"]} == {"gateway.token", "apikey.secret"}
    if target == "overlays/dev":  # its well-known values must load, or the pods would not start
        data = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "scheduler-access")["stringData"]
        for name in ("operator.token", "gateway.token"):
            assert credentials.parse(data[name], credentials.TOKEN_PREFIX) is not None, name
        assert len(data["apikey.secret"].encode()) >= 32
