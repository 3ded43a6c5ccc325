"""The Kubernetes manifests (deploy/k8s): rendered, validated strictly, held to the rules.

Each overlay (cpu, gpu, podman, cpu-sharded, cpu-one-machine) is rendered with ``kubectl
kustomize``. Every core object is validated offline against the Kubernetes 1.30 schema (the
oldest release these manifests support) and the newest one kubernetes-validate ships, in
strict mode (an unknown field is an error); the ServiceMonitor against the schema of the CRD
that prometheus-operator publishes (vendored in deploy/k8s/schemas). Then the rules: pinned
images, probes and limits, GPUs only with GPU images, NetworkPolicies that admit exactly the
intended peers, durable state on PVCs, non-root containers, settings that exist. Each rule
is a function that returns the problems it finds; the last tests feed each one a broken copy
of a real object to show that it can fail. The podman overlay is checked for what Debian's
podman (4.3) can run, and for staying the base's pods; the one-machine overlay for giving
each gateway pod's containers whole cores of their own, with Triton on the pod's loopback.
"""

from __future__ import annotations

import copy
import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from sluice.bench.compare import TRITON_METRICS as BENCH_TRITON_METRICS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "podman", "cpu-sharded", "cpu-one-machine")
CLUSTER_OVERLAYS = ("cpu", "gpu", "cpu-sharded", "cpu-one-machine")
SHARDS = 4  # components/recall-shards, as overlays/cpu-sharded uses it
# The one-machine layout: gateway pods run the four stages, with Triton as a sidecar.
ONE_MACHINE = "cpu-one-machine"
PROBE_SCRIPT = K8S / "overlays" / "podman" / "probe.py"
SERVICEMONITOR_CRD = K8S / "schemas" / "monitoring.coreos.com_servicemonitors.yaml"

Obj = dict[str, Any]

# CRD kinds a manifest may use, each with the published CRD schema it is validated against.
# A CRD kind rendered but missing here fails test_crd_objects_validate (never silently
# unchecked).
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICEMONITOR_CRD}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
SERVER_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Pod"}
IMAGES = {"sluice", "sluice-recall-gpu", "sluice-triton", "sluice-build", "redis", "sluice-redis"}
GPU_IMAGES = {"sluice-recall-gpu", "sluice-triton"}
SERVICES = ("gateway", "recall", "coarse", "fine", "rerank")

# The Secrets the cluster overlays read, with their keys: created out of band
# (docs/deploy.md, "Kubernetes").
SECRETS = {
    "sluice-tls": {
        "tls.crt",
        "tls.key",
        "ca.crt",
        "gateway-client.crt",
        "gateway-client.key",
        "fine-client.crt",
        "fine-client.key",
    },
    "sluice-api-keys": {"keys"},
    "sluice-page-token-keys": {"keys"},
    "sluice-catalog-keys": {"keys"},
    "sluice-redis": {"url", "password", "auth.conf"},
}

# Who may open a connection to each workload, per port (cpu and gpu overlays): "*" is
# anyone, in the cluster or outside it; "ns:monitoring" any pod of that namespace.
EXPECTED_INGRESS: dict[str, dict[int, set[str]]] = {
    "gateway": {50051: {"*"}, 9151: {"ns:monitoring"}},
    "recall": {50061: {"gateway"}, 9161: {"ns:monitoring"}},
    "coarse": {50062: {"gateway"}, 9162: {"ns:monitoring"}},
    "fine": {50063: {"gateway"}, 9163: {"ns:monitoring"}},
    "rerank": {50064: {"gateway"}, 9164: {"ns:monitoring"}},
    "triton": {8001: {"fine"}, 8002: {"ns:monitoring"}},
    "redis": {6379: {"gateway", "recall", "coarse", "fine", "rerank"}},
    "sluice-build": {},
}
DNS = {"ns:kube-system/k8s-app=kube-dns UDP/53", "ns:kube-system/k8s-app=kube-dns TCP/53"}
EXPECTED_EGRESS: dict[str, set[str]] = {
    "gateway": DNS
    | {
        "recall TCP/50061",
        "coarse TCP/50062",
        "fine TCP/50063",
        "rerank TCP/50064",
        "redis TCP/6379",
    },
    "recall": DNS | {"redis TCP/6379"},
    "coarse": DNS | {"redis TCP/6379"},  # the live catalog update log
    "fine": DNS | {"triton TCP/8001", "redis TCP/6379"},
    "rerank": DNS | {"redis TCP/6379"},
    "triton": DNS,
    "redis": DNS,
    "sluice-build": DNS,
}


def expected_policies(name: str) -> tuple[dict[str, dict[int, set[str]]], dict[str, set[str]]]:
    """Who may reach each workload, and what each may reach, in overlay ``name``: with a
    sharded catalog, only the recall front reaches the shards, which reach Redis."""
    ingress, egress = dict(EXPECTED_INGRESS), dict(EXPECTED_EGRESS)
    if name == ONE_MACHINE:  # no stage pods; Triton's metrics are scraped from the gateway's
        ingress = {
            "gateway": {**ingress["gateway"], 8002: {"ns:monitoring"}},
            "redis": {6379: {"gateway"}},
            "sluice-build": {},
        }
        egress = {
            "gateway": DNS | {"redis TCP/6379"},
            "redis": egress["redis"],
            "sluice-build": egress["sluice-build"],
        }
    if name.endswith("-sharded"):
        shards = [f"recall-shard-{i}" for i in range(SHARDS)]
        for shard in shards:
            ingress[shard] = {50061: {"recall"}, 9161: {"ns:monitoring"}}
            egress[shard] = DNS | {"redis TCP/6379"}
        ingress["redis"] = {6379: EXPECTED_INGRESS["redis"][6379] | set(shards)}
        egress["recall"] = egress["recall"] | {f"{s} TCP/50061" for s in shards}
    return ingress, egress


# What Triton exports (docs: Triton Inference Server, "Metrics"), as the benchmarks read it.
TRITON_METRICS = set(BENCH_TRITON_METRICS)


# -- rendering ---------------------------------------------------------------------------


def _kustomize_command() -> list[str] | None:
    """``kubectl kustomize`` when kubectl bundles kustomize v5 or later, else ``kustomize``."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        out = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True
        )
        version = json.loads(out.stdout or "{}").get("kustomizeVersion", "")
        match = re.match(r"v(\d+)", version)
        if match and int(match.group(1)) >= 5:
            return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    return [kustomize, "build"] if kustomize else None


KUSTOMIZE = _kustomize_command()
needs_kustomize = pytest.mark.skipif(
    KUSTOMIZE is None,
    reason="needs kubectl with kustomize v5+ (`kubectl kustomize`) or a kustomize binary on "
    "PATH: the Debian/Ubuntu package `kubectl` from the Kubernetes apt repository, or "
    "Google Cloud's `kubectl` package; Debian's own kubernetes-client 1.20 is too old",
)


@functools.cache
def render(target: str) -> tuple[Obj, ...]:
    """The objects ``kubectl kustomize deploy/k8s/<target>`` prints."""
    assert KUSTOMIZE is not None
    out = subprocess.run(
        [*KUSTOMIZE, str(K8S / target)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kustomize {target} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def overlay(name: str) -> tuple[Obj, ...]:
    return render(f"overlays/{name}")


def by_kind(objects: tuple[Obj, ...], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec a workload runs (None for other kinds)."""
    kind = obj["kind"]
    if kind == "Pod":
        return dict(obj["spec"])
    if kind == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    if kind in WORKLOAD_KINDS:
        return dict(obj["spec"]["template"]["spec"])
    return None


def pod_labels(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return dict(obj["metadata"].get("labels", {}))
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"])
    return dict(obj["spec"]["template"]["metadata"]["labels"])


def containers(obj: Obj) -> list[Obj]:
    """Every container of the pod, init containers (sidecars among them) first."""
    spec = pod_spec(obj) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def main_container(obj: Obj) -> Obj:
    """The workload's own (first, not init) container."""
    return dict((pod_spec(obj) or {})["containers"][0])


def runner(objects: tuple[Obj, ...], service: str) -> Obj:
    """The container that runs ``service`` (a Sluice service or triton): its workload's own,
    or in the one-machine layout the gateway pod's (the stages in the gateway's process,
    Triton in its sidecar)."""
    loads = workloads(objects)
    if service in loads:
        return main_container(loads[service])
    gateway = loads["gateway"]
    if service == "triton":
        return next(c for c in containers(gateway) if c["name"] == "triton")
    return main_container(gateway)


def workloads(objects: tuple[Obj, ...]) -> dict[str, Obj]:
    """Workloads by the name of their pods (label app.kubernetes.io/name)."""
    found = {}
    for o in objects:
        if o["kind"] in WORKLOAD_KINDS:
            name = pod_labels(o)["app.kubernetes.io/name"]
            assert name not in found, f"two workloads run pods named {name}"
            found[name] = o
    return found


def image_name(image: str) -> tuple[str, str | None]:
    """(the image's last path component, its tag or digest; None when untagged)."""
    if "@" in image:
        return image.split("@")[0].rsplit("/", 1)[-1].split(":")[0], image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    name, _, tag = last.partition(":")
    return name, tag or None


def container_env(objects: tuple[Obj, ...], container: Obj) -> dict[str, Any]:
    """A container's environment: values, or ("secret"|"configmap", name, key) references."""
    config_maps = by_kind(objects, "ConfigMap")
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        if "secretRef" in source:
            raise AssertionError("envFrom a whole Secret: name the keys instead")
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "secretKeyRef" in ref:
            env[var["name"]] = ("secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
        elif "configMapKeyRef" in ref:
            r = ref["configMapKeyRef"]
            env[var["name"]] = ("configmap", r["name"], r["key"])
        else:
            env[var["name"]] = var.get("value", "")
    return env


def config_value(objects: tuple[Obj, ...], value: Any) -> str:
    """A plain value, or the value a configmap reference points at."""
    if isinstance(value, tuple):
        kind, name, key = value
        assert kind == "configmap", f"{value} is not readable from the manifests"
        return str(by_kind(objects, "ConfigMap")[name]["data"][key])
    return str(value)


# -- the rules: each returns the problems it finds ---------------------------------------


def image_problems(obj: Obj) -> list[str]:
    problems = []
    for c in containers(obj):
        name, tag = image_name(c["image"])
        if tag is None:
            problems.append(f"{c['name']}: untagged image {c['image']}")
        elif tag == "latest":
            problems.append(f"{c['name']}: :latest image {c['image']}")
        if name not in IMAGES:
            problems.append(f"{c['name']}: image {c['image']} is none of {sorted(IMAGES)}")
    return problems


def probe_problems(obj: Obj) -> list[str]:
    """A server's containers carry startup, readiness and liveness probes."""
    if obj["kind"] not in SERVER_KINDS:
        return []  # a Job's health is its exit status
    problems = []
    for c in containers(obj):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe not in c:
                problems.append(f"{c['name']}: no {probe}")
    return problems


def resource_problems(obj: Obj) -> list[str]:
    problems = []
    for c in containers(obj):
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in res.get(part, {}):
                    problems.append(f"{c['name']}: no {resource} in resources.{part}")
    return problems


def gpu_problems(obj: Obj) -> list[str]:
    """A GPU is asked for only by a container whose image uses one."""
    problems = []
    for c in containers(obj):
        res = c.get("resources", {})
        asked = {
            k for part in ("requests", "limits") for k in res.get(part, {}) if "gpu" in k.lower()
        }
        if asked and image_name(c["image"])[0] not in GPU_IMAGES:
            problems.append(f"{c['name']}: asks for {sorted(asked)} with {c['image']}")
    return problems


def security_problems(obj: Obj) -> list[str]:
    """Non-root, no privilege escalation, no capabilities, a read-only root filesystem."""
    spec = pod_spec(obj) or {}
    pod = spec.get("securityContext", {})
    problems = []
    for c in containers(obj):
        ctx = c.get("securityContext", {})
        if not ctx.get("runAsNonRoot", pod.get("runAsNonRoot")):
            problems.append(f"{c['name']}: runAsNonRoot is not set")
        if ctx.get("runAsUser", pod.get("runAsUser", 0)) == 0:
            problems.append(f"{c['name']}: runs as uid 0")
        if ctx.get("allowPrivilegeEscalation", True):
            problems.append(f"{c['name']}: allowPrivilegeEscalation")
        if "ALL" not in ctx.get("capabilities", {}).get("drop", []):
            problems.append(f"{c['name']}: capabilities not dropped")
        if not ctx.get("readOnlyRootFilesystem"):
            problems.append(f"{c['name']}: writable root filesystem")
        if ctx.get("privileged"):
            problems.append(f"{c['name']}: privileged")
    return problems


def pvc_mounts(obj: Obj) -> set[str]:
    """Mount paths backed by a PersistentVolumeClaim (a volume or a volumeClaimTemplate)."""
    spec = pod_spec(obj) or {}
    claims = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
    if obj["kind"] == "StatefulSet":
        claims |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
    return {
        m["mountPath"]
        for c in containers(obj)
        for m in c.get("volumeMounts", [])
        if m["name"] in claims
    }


def redis_conf(objects: tuple[Obj, ...], redis: Obj) -> dict[str, str]:
    """The settings of the redis.conf file the Redis container starts with."""
    c = containers(redis)[0]
    conf_path = Path(next(a for a in c["args"] if a.endswith(".conf")))
    mount = next(m for m in c["volumeMounts"] if conf_path.parent == Path(m["mountPath"]))
    volume = next(v for v in pod_spec(redis)["volumes"] if v["name"] == mount["name"])  # type: ignore[index]
    data = by_kind(objects, "ConfigMap")[volume["configMap"]["name"]]["data"]
    settings = {}
    for line in data[conf_path.name].splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.strip().partition(" ")
            settings[key] = value
    return settings


def durable_state_problems(objects: tuple[Obj, ...]) -> list[str]:
    """The event log and the online state live in Redis (AOF, synced) on a PVC, or on a PVC."""
    loads = workloads(objects)
    problems = []
    env = container_env(objects, main_container(loads["gateway"]))
    if env.get("SLUICE_GATEWAY_STATE") != "redis":
        problems.append("gateway: the online state is not in Redis (each pod would keep its own)")
    if env.get("SLUICE_GATEWAY_EVENT_LOG") != "redis":
        # a file log is durable only on a PersistentVolumeClaim
        log_dir = str(env.get("SLUICE_GATEWAY_EVENT_LOG_DIR", "var/events"))
        if not any(log_dir.startswith(p + "/") for p in pvc_mounts(loads["gateway"])):
            problems.append(f"gateway: the event log ({log_dir}) is on the pod's own disk")
    if "redis" not in loads:
        return [*problems, "no Redis workload"]
    redis = loads["redis"]
    conf = redis_conf(objects, redis)
    if conf.get("appendonly") != "yes" or conf.get("appendfsync") != "always":
        problems.append(f"redis: not an AOF synced on every write: {conf}")
    if conf.get("dir", "/data") not in pvc_mounts(redis):
        problems.append(f"redis: its dir {conf.get('dir')} is not on a PersistentVolumeClaim")
    return problems


def network_peers(objects: tuple[Obj, ...], peer: Obj) -> set[str]:
    """What one NetworkPolicy peer admits, as workload names or "ns:..." / "ip:..."."""
    if "ipBlock" in peer:
        return {f"ip:{peer['ipBlock']['cidr']}"}
    pods = peer.get("podSelector")
    if "namespaceSelector" in peer:
        ns = peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name")
        where = f"ns:{ns or '*'}"
        if pods:
            where += "/" + ",".join(f"{k}={v}" for k, v in pods.get("matchLabels", {}).items())
        return {where}
    return {name for name, w in workloads(objects).items() if selects(pods or {}, pod_labels(w))}


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    if selector.get("matchExpressions"):
        raise AssertionError("matchExpressions in a NetworkPolicy: teach this test to read them")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_allowed(objects: tuple[Obj, ...]) -> dict[str, dict[int, set[str]]]:
    """For each workload, who the NetworkPolicies admit on which port."""
    policies = list(by_kind(objects, "NetworkPolicy").values())
    allowed: dict[str, dict[int, set[str]]] = {}
    for name, w in workloads(objects).items():
        labels = pod_labels(w)
        ports = {p["name"]: p["containerPort"] for c in containers(w) for p in c.get("ports", [])}
        allowed[name] = {}
        for pol in policies:
            spec = pol["spec"]
            if "Ingress" not in spec["policyTypes"] or not selects(spec["podSelector"], labels):
                continue
            for rule in spec.get("ingress", []):
                peers = (
                    set().union(*(network_peers(objects, p) for p in rule["from"]))
                    if "from" in rule
                    else {"*"}
                )
                for port in rule.get("ports", [{"port": "*"}]):
                    number = ports.get(port["port"], port["port"])
                    allowed[name].setdefault(number, set()).update(peers)
    return allowed


def egress_allowed(objects: tuple[Obj, ...]) -> dict[str, set[str]]:
    """For each workload, the "<peer> <PROTOCOL>/<port>" it may connect to."""
    policies = list(by_kind(objects, "NetworkPolicy").values())
    allowed: dict[str, set[str]] = {}
    for name, w in workloads(objects).items():
        allowed[name] = set()
        for pol in policies:
            spec = pol["spec"]
            if "Egress" not in spec["policyTypes"] or not selects(
                spec["podSelector"], pod_labels(w)
            ):
                continue
            for rule in spec.get("egress", []):
                peers = (
                    set().union(*(network_peers(objects, p) for p in rule["to"]))
                    if "to" in rule
                    else {"*"}
                )
                for port in rule.get("ports", [{"port": "*", "protocol": "*"}]):
                    protocol = port.get("protocol", "TCP")
                    allowed[name] |= {f"{p} {protocol}/{port['port']}" for p in peers}
    return allowed


def network_policy_problems(objects: tuple[Obj, ...], name: str = "cpu") -> list[str]:
    expected_ingress, expected_egress = expected_policies(name)
    problems = []
    deny_all = [
        p
        for p in by_kind(objects, "NetworkPolicy").values()
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    if not deny_all:
        problems.append("no default-deny NetworkPolicy (ingress and egress) for every pod")
    ingress, egress = ingress_allowed(objects), egress_allowed(objects)
    for load in sorted(set(ingress) | set(expected_ingress)):
        if ingress.get(load) != expected_ingress.get(load):
            problems.append(
                f"ingress of {load}: {ingress.get(load)} != {expected_ingress.get(load)}"
            )
        if egress.get(load) != expected_egress.get(load):
            problems.append(f"egress of {load}: {egress.get(load)} != {expected_egress.get(load)}")
    return problems


RULES: dict[str, Callable[[Obj], list[str]]] = {
    "image": image_problems,
    "probes": probe_problems,
    "resources": resource_problems,
    "gpu": gpu_problems,
    "security": security_problems,
}


def all_workloads() -> Iterator[tuple[str, Obj]]:
    for name in OVERLAYS:
        for w in workloads(overlay(name)).values():
            yield name, w


# -- rendering and schemas ---------------------------------------------------------------


@needs_kustomize
@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_renders_unique_named_objects(name: str) -> None:
    objects = overlay(name)
    ids = [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects]
    assert ids and len(ids) == len(set(ids))
    assert all("namespace" not in o["metadata"] for o in objects), "the base is namespace-agnostic"


def _k8s_versions() -> tuple[str, ...]:
    from kubernetes_validate import utils  # type: ignore[import-untyped]

    return ("1.30", utils.major_minor(utils.latest_version()))


@needs_kustomize
@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("version", _k8s_versions())
def test_core_objects_validate_strictly(name: str, version: str) -> None:
    """kubernetes-validate --strict against the schema of that Kubernetes release, offline."""
    import kubernetes_validate

    problems = []
    for obj in overlay(name):
        if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(str(p) for p in err.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {err.message}")
    assert not problems, "\n".join(problems)


def test_strict_validation_rejects_an_unknown_field() -> None:
    """What 'strict' buys: a misspelt field is an error, not silently dropped."""
    import kubernetes_validate

    service: Obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 1, "targetPrt": 2}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, "1.30", strict=True)
    del service["spec"]["ports"][0]["targetPrt"]
    kubernetes_validate.validate(service, "1.30", strict=True)


def _structural(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema, strict like the API server's field
    validation: unknown fields are errors unless the schema preserves them."""
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _structural(v) for k, v in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(path: Path, api_version: str) -> Any:
    import jsonschema  # type: ignore[import-untyped]
    import kubernetes_validate
    from referencing import Registry, Resource

    crd = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    version = api_version.split("/")[1]
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = _structural(served["schema"]["openAPIV3Schema"])
    # the CRD leaves metadata to the API server: check it as ObjectMeta
    defs = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    definitions = json.loads((defs / "v1.30.0-local-strict" / "_definitions.json").read_text())
    schema["properties"]["metadata"] = {
        "$ref": definitions["$id"] + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    registry: Registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


@needs_kustomize
@pytest.mark.parametrize("name", OVERLAYS)
def test_crd_objects_validate_against_their_published_schema(name: str) -> None:
    core_groups = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1"}
    problems = []
    for obj in overlay(name):
        key = (obj["apiVersion"], obj["kind"])
        if obj["apiVersion"] in core_groups or obj["apiVersion"].startswith("networking.k8s.io/"):
            continue
        if key not in CRD_SCHEMAS:
            problems.append(f"{key}: no published CRD schema vendored to check it against")
            continue
        validator = _crd_validator(CRD_SCHEMAS[key], obj["apiVersion"])
        problems += [
            f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
            for e in validator.iter_errors(obj)
        ]
    assert not problems, "\n".join(problems)


def test_crd_schema_check_rejects_a_wrong_servicemonitor() -> None:
    validator = _crd_validator(SERVICEMONITOR_CRD, "monitoring.coreos.com/v1")
    good: Obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "metrics", "interval": "15s"}]},
    }
    assert not list(validator.iter_errors(good))
    typo = copy.deepcopy(good)
    typo["spec"]["endpoints"][0]["prot"] = typo["spec"]["endpoints"][0].pop("port")
    assert list(validator.iter_errors(typo))
    bad_interval = copy.deepcopy(good)
    bad_interval["spec"]["endpoints"][0]["interval"] = "soon"
    assert list(validator.iter_errors(bad_interval))


# -- the rules on every overlay ------------------------------------------------------------


@needs_kustomize
@pytest.mark.parametrize("rule", ["image", "resources", "gpu", "security"])
def test_rule_holds_for_every_workload(rule: str) -> None:
    problems = [
        f"{name}: {w['kind']}/{w['metadata']['name']}: {p}"
        for name, w in all_workloads()
        for p in RULES[rule](w)
    ]
    assert not problems, "\n".join(problems)


@needs_kustomize
@pytest.mark.parametrize("name", CLUSTER_OVERLAYS)
def test_every_server_has_startup_readiness_and_liveness_probes(name: str) -> None:
    objects = overlay(name)
    loads = workloads(objects)
    problems = [p for w in loads.values() for p in probe_problems(w)]
    assert not problems, "\n".join(problems)
    services = [runner(objects, s) for s in SERVICES]
    # the services' probes ask the plaintext health port, the one port without TLS
    assert all(
        c[p]["grpc"]["port"] == 9090 for c in services for p in ("startupProbe", "livenessProbe")
    )
    triton = runner(objects, "triton")
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert containers(loads["redis"])[0]["livenessProbe"]["exec"]["command"] == [
        "redis-cli",
        "ping",
    ]


@needs_kustomize
@pytest.mark.parametrize("name", OVERLAYS)
def test_event_log_and_redis_data_are_durable(name: str) -> None:
    objects = overlay(name)
    assert not durable_state_problems(objects)
    loads = workloads(objects)
    assert {"/data"} <= pvc_mounts(loads["redis"])
    if name != "podman":
        assert loads["redis"]["kind"] == "StatefulSet"
        assert loads["redis"]["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


@needs_kustomize
@pytest.mark.parametrize("name", CLUSTER_OVERLAYS)
def test_network_policies_admit_exactly_the_intended_peers(name: str) -> None:
    problems = network_policy_problems(overlay(name), name)
    assert not problems, "\n".join(problems)


@needs_kustomize
def test_gpu_only_in_the_gpu_overlay_and_only_where_used() -> None:
    def gpus(objects: tuple[Obj, ...]) -> set[str]:
        return {
            name
            for name, w in workloads(objects).items()
            for c in containers(w)
            if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
        }

    assert gpus(overlay("cpu")) == set() and gpus(overlay("podman")) == set()
    gpu = overlay("gpu")
    assert gpus(gpu) == {"triton", "recall"}
    loads = workloads(gpu)
    recall = containers(loads["recall"])[0]
    assert image_name(recall["image"])[0] == "sluice-recall-gpu"
    assert container_env(gpu, recall)["SLUICE_RECALL_USE_GPU"] == "true"
    assert "--model-config-name=gpu" in containers(loads["triton"])[0]["args"]
    for w in (loads["recall"], loads["triton"]):
        spec = pod_spec(w) or {}
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
    cpu_triton = containers(workloads(overlay("cpu"))["triton"])[0]
    assert not any(a.startswith("--model-config-name") for a in cpu_triton["args"])


@needs_kustomize
@pytest.mark.parametrize("name", CLUSTER_OVERLAYS)
def test_every_deployment_has_an_hpa_and_a_pdb(name: str) -> None:
    objects = overlay(name)
    deployments = by_kind(objects, "Deployment")
    hpas = {
        h["spec"]["scaleTargetRef"]["name"]: h
        for h in by_kind(objects, "HorizontalPodAutoscaler").values()
    }
    pdbs = list(by_kind(objects, "PodDisruptionBudget").values())
    assert set(hpas) == set(deployments)
    for dep_name, dep in deployments.items():
        labels = pod_labels(dep)
        assert any(selects(p["spec"]["selector"], labels) for p in pdbs), f"no PDB for {dep_name}"
        metrics = hpas[dep_name]["spec"]["metrics"]
        if dep_name == "triton":  # queue time from Triton, through prometheus-adapter
            assert metrics[0]["type"] == "Pods"
            assert (
                metrics[0]["pods"]["metric"]["name"] == "nv_inference_queue_duration_us_per_request"
            )
        else:
            assert metrics[0]["resource"]["name"] == "cpu"
        assert hpas[dep_name]["spec"]["minReplicas"] >= 2


@needs_kustomize
@pytest.mark.parametrize("name", CLUSTER_OVERLAYS)
def test_secrets_are_the_documented_ones_and_tls_is_mounted(name: str) -> None:
    objects = overlay(name)
    assert not by_kind(objects, "Secret"), "Secrets are created out of band, never committed"
    used: dict[str, set[str]] = {}
    for w in workloads(objects).values():
        for v in (pod_spec(w) or {}).get("volumes", []):
            if "secret" in v:
                assert v["secret"]["optional"] is False
                used.setdefault(v["secret"]["secretName"], set()).update(
                    i["key"] for i in v["secret"]["items"]
                )
        for c in containers(w):
            for value in container_env(objects, c).values():
                if isinstance(value, tuple) and value[0] == "secret":
                    used.setdefault(value[1], set()).add(value[2])
    assert set(used) == set(SECRETS)
    assert all(used[s] <= SECRETS[s] for s in used), used
    for service in (*SERVICES, "triton"):
        mounts = {m["mountPath"]: m for m in runner(objects, service)["volumeMounts"]}
        assert mounts["/etc/sluice/tls"]["readOnly"] is True


# -- settings, addresses, Triton -----------------------------------------------------------


def settings_fields() -> dict[str, set[str]]:
    from pydantic_settings import BaseSettings

    from sluice import config, paths

    classes: dict[str, type[BaseSettings]] = {
        "GATEWAY": config.GatewaySettings,
        "RECALL": config.RecallSettings,
        "COARSE": config.CoarseSettings,
        "FINE": config.FineSettings,
        "RERANK": config.RerankSettings,
    }
    fields = {f"SLUICE_{p}_": set(c.model_fields) for p, c in classes.items()}
    fields[paths.HOME_ENV] = {""}
    return fields


@needs_kustomize
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_sluice_variable_is_a_real_setting(name: str) -> None:
    """A misspelt SLUICE_* name would be ignored silently by the service: fail here instead."""
    objects = overlay(name)
    fields = settings_fields()
    names = {k for cm in by_kind(objects, "ConfigMap").values() for k in cm.get("data", {})}
    names |= {
        v["name"]
        for w in workloads(objects).values()
        for c in containers(w)
        for v in c.get("env", [])
    }
    unknown = []
    for var in sorted(n for n in names if n.startswith("SLUICE_")):
        prefix = next((p for p in fields if var.startswith(p)), None)
        field = var[len(prefix) :].lower() if prefix else None
        if prefix is None or field not in fields[prefix]:
            unknown.append(var)
    assert not unknown, f"not settings in sluice.config: {unknown}"


@needs_kustomize
@pytest.mark.parametrize("name", [n for n in OVERLAYS if n != ONE_MACHINE])
def test_addresses_reach_the_right_pods(name: str) -> None:
    """The gateway's stage addresses and the fine stage's Triton URL name a Service (or, under
    podman, a pod) of that workload, on a port it listens on."""
    objects = overlay(name)
    loads = workloads(objects)
    env = container_env(objects, main_container(loads["gateway"]))
    fine_env = container_env(objects, main_container(loads["fine"]))
    wanted = {stage: env[f"SLUICE_GATEWAY_{stage.upper()}_ADDR"] for stage in SERVICES[1:]}
    wanted["triton"] = fine_env["SLUICE_FINE_TRITON_URL"]
    services = by_kind(objects, "Service")
    cluster = workloads(overlay("cpu"))  # podman's pods declare no ports (they would publish)
    for target, address in wanted.items():
        if name != "podman" and target != "triton":  # every replica, balanced by the gateway
            assert address.startswith("dns:///"), f"{target}: {address} reaches one pod only"
        host, _, port = address.removeprefix("dns:///").rpartition(":")
        listening = {p["containerPort"] for c in containers(cluster[target]) for p in c["ports"]}
        if name == "podman":
            assert host == f"{loads[target]['metadata']['name']}-pod-0"
        else:
            svc = services[host]["spec"]
            assert selects({"matchLabels": svc["selector"]}, pod_labels(loads[target]))
            assert svc.get("clusterIP") == "None", "stages are reached through headless Services"
            assert int(port) in {p["port"] for p in svc["ports"]}
        assert int(port) in listening, f"{target} does not listen on {port}"
    for service in ("gateway", "recall"):
        url = container_env(objects, main_container(loads[service]))[
            f"SLUICE_{service.upper()}_REDIS_URL"
        ]
        if name == "podman":  # the development credentials name the Redis pod
            assert config_value(objects, url).split("@")[1].startswith("redis-pod-0:6379/")
        else:  # the password is in the URL: a Secret
            assert url == ("secret", "sluice-redis", "url")


def exclusive_cpu_problems(obj: Obj) -> list[str]:
    """What keeps the kubelet's static CPU manager from giving each container cores of its
    own: the pod must be Guaranteed (every container, init and sidecar too, with requests =
    limits for CPU and memory) and each container's CPU a whole number."""
    problems = []
    for c in containers(obj):
        res = c.get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        for resource in ("cpu", "memory"):
            limit = limits.get(resource)  # an unset request defaults to the limit
            if limit is None or requests.get(resource, limit) != limit:
                problems.append(f"{c['name']}: {resource} requests != limits (not Guaranteed)")
        if not re.fullmatch(r"[1-9][0-9]*", str(limits.get("cpu", ""))):
            problems.append(f"{c['name']}: cpu {limits.get('cpu')!r} is not whole CPUs")
    return problems


@needs_kustomize
def test_one_machine_overlay_runs_the_stages_and_triton_in_each_gateway_pod() -> None:
    """`sluice up --stages local --pin-cpus` as Kubernetes runs it: the gateway pods run the
    stages in their process with Triton as a sidecar on cores of their own, and the Triton
    URL the fine engine calls is that sidecar, on loopback only, under the name its server
    certificate carries."""
    objects = overlay(ONE_MACHINE)
    loads = workloads(objects)
    assert set(loads) == {"gateway", "redis", "sluice-build"}
    gateway = loads["gateway"]
    assert not exclusive_cpu_problems(gateway), exclusive_cpu_problems(gateway)
    assert [c["resources"]["limits"]["cpu"] for c in containers(gateway)] == ["1", "1"]
    env = container_env(objects, main_container(gateway))
    assert config_value(objects, env["SLUICE_GATEWAY_STAGES"]) == "local"
    # Triton: a native sidecar (up before the gateway, stopped after it)
    spec = pod_spec(gateway) or {}
    (triton,) = spec["initContainers"]
    assert triton["name"] == "triton" and triton["restartPolicy"] == "Always"
    assert "startupProbe" in triton  # the gateway starts once the ranker is ready
    host, _, port = config_value(objects, env["SLUICE_FINE_TRITON_URL"]).rpartition(":")
    aliases = {h: a["ip"] for a in spec.get("hostAliases", []) for h in a["hostnames"]}
    assert aliases.get(host) == "127.0.0.1", f"{host} is not the pod's own Triton"
    args = dict(a.removeprefix("--").split("=", 1) for a in triton["args"])
    assert args["grpc-port"] == port and args["grpc-address"] == "127.0.0.1"
    assert args["grpc-use-ssl-mutual"] == "true"  # the same mTLS as the split layout
    # otherwise the split layout's Triton: the same image, arguments, probes and mounts
    cpu_triton = main_container(workloads(overlay("cpu"))["triton"])
    assert [a for a in triton["args"] if not a.startswith("--grpc-address=")] == cpu_triton["args"]
    for key in ("image", "command", "startupProbe", "readinessProbe", "livenessProbe"):
        assert triton[key] == cpu_triton[key], key
    assert triton["securityContext"] == cpu_triton["securityContext"]
    assert triton["volumeMounts"] == cpu_triton["volumeMounts"]
    # the fine engine's client certificate reaches the gateway; nothing of a stage is left
    (tls,) = (v for v in spec["volumes"] if v["name"] == "tls")
    for key in ("SLUICE_FINE_TRITON_TLS_CERT_FILE", "SLUICE_FINE_TRITON_TLS_KEY_FILE"):
        path = Path(config_value(objects, env[key]))
        assert path.name in {i["path"] for i in tls["secret"]["items"]}
    assert not {"recall", "coarse", "fine", "rerank", "triton"} & set(by_kind(objects, "Service"))
    # the grace period fits preStop, the gateway's drain (RunningService.stop: 5 s), then
    # Triton's own exit
    pre_stop = main_container(gateway)["lifecycle"]["preStop"]["sleep"]["seconds"]
    exit_s = int(args["exit-timeout-secs"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + 5 + exit_s


@needs_kustomize
def test_exclusive_cpu_rule_flags_a_pod_that_is_not_guaranteed() -> None:
    pod = _deployment("gateway")
    spec = pod["spec"]["template"]["spec"]
    whole = {"cpu": "1", "memory": "1Gi"}
    spec["containers"][0]["resources"] = {"requests": dict(whole), "limits": dict(whole)}
    assert not exclusive_cpu_problems(pod)
    spec["containers"][0]["resources"]["limits"]["cpu"] = "1500m"
    assert exclusive_cpu_problems(pod) == [
        "gateway: cpu requests != limits (not Guaranteed)",
        "gateway: cpu '1500m' is not whole CPUs",
    ]
    spec["containers"][0]["resources"] = {"requests": dict(whole), "limits": dict(whole)}
    spec["initContainers"] = [{"name": "sidecar", "resources": {"limits": {"cpu": "1"}}}]
    assert exclusive_cpu_problems(pod) == ["sidecar: memory requests != limits (not Guaranteed)"]


@needs_kustomize
@pytest.mark.parametrize("name", OVERLAYS)
def test_triton_polls_the_shared_model_repository(name: str) -> None:
    objects = overlay(name)
    triton = runner(objects, "triton")
    args = triton["args"]
    assert "--model-control-mode=poll" in args
    repo = next(a.split("=", 1)[1] for a in args if a.startswith("--model-repository="))
    assert any(
        repo.startswith(m["mountPath"] + "/") and m.get("readOnly")
        for m in triton["volumeMounts"]
        if m["name"] == "sluice"
    )
    for service in SERVICES:
        c = runner(objects, service)
        assert {"mountPath": "/var/lib/sluice", "name": "sluice", "readOnly": True} in c[
            "volumeMounts"
        ]
    expected = {"gpu": "gpu", "podman": "local"}.get(name)
    given = [a.split("=", 1)[1] for a in args if a.startswith("--model-config-name=")]
    assert given == ([expected] if expected else [])
    if expected:
        assert (
            ROOT / "model_repository" / "fine_ranker" / "configs" / f"{expected}.pbtxt"
        ).exists()


@needs_kustomize
@pytest.mark.parametrize("name", CLUSTER_OVERLAYS)
def test_servicemonitor_scrapes_every_metrics_port(name: str) -> None:
    objects = overlay(name)
    (monitor,) = by_kind(objects, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = {
        (pod_labels(w)["app.kubernetes.io/name"], p["targetPort"])
        for svc in by_kind(objects, "Service").values()
        if selects(selector, svc["metadata"].get("labels", {}))
        for w in workloads(objects).values()
        if selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(w))
        for p in svc["spec"]["ports"]
        if p["name"] in endpoint_ports
    }
    exported = {
        (name_, p["name"])
        for name_, w in workloads(objects).items()
        for c in containers(w)
        for p in c.get("ports", [])
        if p["name"].endswith("metrics")  # triton-metrics: the one-machine pod's sidecar
    }
    assert exported and scraped == exported
    gateway_svc = by_kind(objects, "Service")["gateway"]
    assert [p["port"] for p in gateway_svc["spec"]["ports"]] == [50051]


def exported_metric_names() -> set[str]:
    """The series names Sluice's own code exports (its prometheus_client collectors)."""
    import importlib

    from prometheus_client import REGISTRY

    for module in (
        "sluice.core.server",
        "sluice.core.admission",
        "sluice.gateway.pipeline",
        "sluice.gateway.service",
    ):
        importlib.import_module(module)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, [""])
    }


def test_dashboard_uses_real_metric_names() -> None:
    dashboard = json.loads((K8S / "base" / "grafana" / "sluice.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b([a-z_][a-z0-9_]*)\{", e)}
    known = exported_metric_names() | TRITON_METRICS
    assert used and used <= known, f"unknown metrics: {used - known}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("stage latency", "degraded", "queue time", "batch size"):
        assert topic in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- podman ------------------------------------------------------------------------------

PODMAN_KINDS = {"Pod", "Deployment", "PersistentVolumeClaim", "ConfigMap", "Secret"}


def podman_problems(objects: tuple[Obj, ...]) -> list[str]:
    """What Debian's podman 4.3 `kube play` cannot run, or runs differently from the YAML."""
    problems = [
        f"{o['kind']}/{o['metadata']['name']}: not run by podman"
        for o in objects
        if o["kind"] not in PODMAN_KINDS
    ]
    for o in objects:
        if o["kind"] == "Secret":
            problems.append(f"Secret/{o['metadata']['name']}: podman 4.3 mangles Secrets")
        if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] in {
            "sluice-artifacts",
            "sluice-tls",
        }:
            problems.append(f"PVC/{o['metadata']['name']}: its volume is filled before the play")
        if o["kind"] not in WORKLOAD_KINDS:
            continue
        if o["spec"].get("replicas", 1) != 1:
            problems.append(f"{o['metadata']['name']}: replicas != 1")
        for v in (pod_spec(o) or {}).get("volumes", []):
            kinds = set(v) - {"name"}
            if not kinds <= {"persistentVolumeClaim", "configMap", "emptyDir", "hostPath"}:
                problems.append(f"{o['metadata']['name']}: volume {v['name']} is {kinds}")
        for c in containers(o):
            for probe in ("startupProbe", "readinessProbe"):
                if probe in c:
                    problems.append(f"{c['name']}: podman ignores {probe}")
            if "exec" not in c.get("livenessProbe", {}):
                problems.append(f"{c['name']}: no exec liveness probe")
            for m in c.get("volumeMounts", []):
                if "subPath" in m:
                    problems.append(f"{c['name']}: podman ignores subPath")
            for var in c.get("env", []):
                if "secretKeyRef" in var.get("valueFrom", {}):
                    problems.append(f"{c['name']}: env {var['name']} from a Secret")
            for port in c.get("ports", []):
                # podman 4.3 publishes every container port on the host (on its own number
                # when no hostPort is given), so each one must be meant for the host
                if port.get("hostIP") != "127.0.0.1" or "hostPort" not in port:
                    problems.append(f"{c['name']}: port {port} published beyond loopback")
    # podman 4.3 names an emptyDir's volume after it: one name in two pods is one shared volume
    empty_dirs = [
        v["name"]
        for o in objects
        for v in (pod_spec(o) or {}).get("volumes", [])
        if "emptyDir" in v
    ]
    problems += [f"emptyDir {n} shared by pods" for n in set(empty_dirs) if empty_dirs.count(n) > 1]
    return problems


@needs_kustomize
def test_podman_overlay_is_what_podman_runs() -> None:
    objects = overlay("podman")
    assert not podman_problems(objects), "\n".join(podman_problems(objects))
    loads = workloads(objects)
    assert set(loads) == {*SERVICES, "triton", "redis"}
    for name in SERVICES:
        assert containers(loads[name])[0]["livenessProbe"]["exec"]["command"] == [
            "python3",
            "/etc/sluice/probe/probe.py",
            "grpc",
            "127.0.0.1:9090",
        ]
    published = [p for w in loads.values() for c in containers(w) for p in c.get("ports", [])]
    assert published == [
        {"name": "grpc", "containerPort": 50051, "hostPort": 30051, "hostIP": "127.0.0.1"}
    ]
    # and the check can fail: the cluster overlay is not something podman runs
    assert podman_problems(overlay("cpu"))


# Images built here for what the cluster pulls from elsewhere.
PODMAN_STANDINS = {"sluice-redis": "redis"}


def _comparable(container: Obj) -> Obj:
    """The parts of a container the podman overlay must keep as the base has them."""
    image = image_name(container["image"])[0]
    return {
        "name": container["name"],
        "image": PODMAN_STANDINS.get(image, image),
        "args": [a for a in container.get("args", []) if not a.startswith("--model-config-name")],
        "command": container.get("command"),
        "resources": container.get("resources"),
        "securityContext": container.get("securityContext"),
        # the podman overlay runs without components/merchant-rules: podman 4.3's ConfigMap
        # volumes are not checked here (make test-containers has not run them)
        "env": sorted(
            v["name"] for v in container.get("env", []) if v["name"] != "SLUICE_GATEWAY_RULES_FILE"
        ),
        "mounts": sorted(
            m["mountPath"]
            for m in container.get("volumeMounts", [])
            if m["mountPath"] not in {"/etc/sluice/probe", "/dev/shm", "/etc/sluice/rules"}
        ),
    }


@needs_kustomize
def test_podman_overlay_runs_the_base_pods() -> None:
    """Same containers, commands, ports, limits, security, settings and mounts as the cluster
    overlay; only the addresses (pod names) and the credentials' source differ."""
    base = workloads(overlay("cpu"))
    podman = workloads(overlay("podman"))
    for name, w in podman.items():
        assert [_comparable(c) for c in containers(w)] == [
            _comparable(c) for c in containers(base[name])
        ], name
        assert (pod_spec(w) or {})["securityContext"] == (pod_spec(base[name]) or {})[
            "securityContext"
        ]
    settings = {
        o["metadata"]["name"].rsplit("-", 1)[0]: o["data"]
        for o in overlay("cpu")
        if o["kind"] == "ConfigMap"
    }
    podman_settings = {
        o["metadata"]["name"].rsplit("-", 1)[0]: o["data"]
        for o in overlay("podman")
        if o["kind"] == "ConfigMap"
    }
    assert podman_settings["redis-config"] == settings["redis-config"]
    ours, theirs = podman_settings["sluice"], settings["sluice"]
    assert set(ours) == set(theirs)
    changed = {k for k in ours if ours[k] != theirs[k]}
    assert changed == {
        "SLUICE_GATEWAY_RECALL_ADDR",
        "SLUICE_GATEWAY_COARSE_ADDR",
        "SLUICE_GATEWAY_FINE_ADDR",
        "SLUICE_GATEWAY_RERANK_ADDR",
        "SLUICE_FINE_TRITON_URL",
    }


# -- the rules can fail ---------------------------------------------------------------------


def _deployment(name: str) -> Obj:
    return copy.deepcopy(workloads(overlay("cpu"))[name])


@needs_kustomize
def test_each_rule_flags_a_broken_object() -> None:
    gateway = _deployment("gateway")
    assert not any(rule(gateway) for rule in RULES.values())
    c = containers

    latest = _deployment("gateway")
    c(latest)[0]["image"] = "registry.example.com/sluice/sluice:latest"
    assert image_problems(latest)
    untagged = _deployment("gateway")
    c(untagged)[0]["image"] = "registry.example.com/sluice/sluice"
    assert image_problems(untagged)

    no_liveness = _deployment("recall")
    del no_liveness["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    assert probe_problems(no_liveness) == ["recall: no livenessProbe"]

    no_limit = _deployment("fine")
    del no_limit["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert resource_problems(no_limit) == ["fine: no memory in resources.limits"]

    gpu_on_cpu_image = _deployment("coarse")
    gpu_on_cpu_image["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ] = "1"
    assert gpu_problems(gpu_on_cpu_image)
    gpu_recall = _deployment("recall")
    spec = gpu_recall["spec"]["template"]["spec"]["containers"][0]
    spec["resources"]["limits"]["nvidia.com/gpu"] = "1"
    assert gpu_problems(gpu_recall)  # the CPU image, with faiss-cpu
    spec["image"] = "registry.example.com/sluice/sluice-recall-gpu:0.1.0"
    assert not gpu_problems(gpu_recall)

    root = _deployment("rerank")
    root["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    root["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = False
    assert len(security_problems(root)) == 2


@needs_kustomize
def test_durable_state_rule_flags_an_event_log_on_the_pod() -> None:
    objects = [copy.deepcopy(o) for o in overlay("cpu")]
    (settings,) = (
        o
        for o in objects
        if o["kind"] == "ConfigMap"
        and o["metadata"]["name"].startswith("sluice-")
        and "SLUICE_GATEWAY_EVENT_LOG" in o["data"]
    )
    settings["data"]["SLUICE_GATEWAY_EVENT_LOG"] = "file"
    assert durable_state_problems(tuple(objects))
    (redis,) = (o for o in objects if o["kind"] == "StatefulSet")
    redis["spec"]["volumeClaimTemplates"] = []
    assert any("redis" in p for p in durable_state_problems(tuple(objects)))


@needs_kustomize
def test_network_policy_rule_flags_a_too_open_policy() -> None:
    objects = [copy.deepcopy(o) for o in overlay("cpu")]
    (triton,) = (
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "triton"
    )
    triton["spec"]["ingress"][0]["from"].append(
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}
    )
    assert any("ingress of triton" in p for p in network_policy_problems(tuple(objects)))
    objects = [o for o in objects if o["metadata"]["name"] != "default-deny"]
    assert any("default-deny" in p for p in network_policy_problems(tuple(objects)))


# -- the podman liveness probe, against real servers ------------------------------------------


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROBE_SCRIPT), *args], capture_output=True, text=True, timeout=30
    )


def test_podman_probe_checks_grpc_health() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        out = _probe("grpc", f"127.0.0.1:{port}")
        assert out.returncode == 1 and "NOT_SERVING" in out.stderr
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _probe("grpc", f"127.0.0.1:{port}").returncode == 0
    finally:
        server.stop(None)
    out = _probe("grpc", f"127.0.0.1:{port}")
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr


def test_podman_probe_checks_http_health() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/v2/health/live" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _probe("http", f"{base}/v2/health/live").returncode == 0
        out = _probe("http", f"{base}/v2/health/ready")
        assert out.returncode == 1 and "503" in out.stderr
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert _probe("http", f"{base}/v2/health/live").returncode == 1
    assert _probe("bogus").returncode == 2


@needs_kustomize
@pytest.mark.parametrize("name", CLUSTER_OVERLAYS)
def test_the_gateway_reads_the_merchant_rules_from_a_configmap_it_can_parse(
    name: str, tmp_path: Path
) -> None:
    """components/merchant-rules: the file the gateway is told to read is the mounted
    ConfigMap key, and it is a rules file the gateway accepts (a bad one stops its start)."""
    from sluice.rules import read_rules

    objects = overlay(name)
    gateway = workloads(objects)["gateway"]
    (container,) = [c for c in containers(gateway) if c["name"] == "gateway"]
    env = {v["name"]: v.get("value") for v in container.get("env", [])}
    path = Path(env["SLUICE_GATEWAY_RULES_FILE"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(gateway)["volumes"]}  # type: ignore[index]
    mount = mounts["merchant-rules"]
    assert mount["readOnly"] and path.parent == Path(mount["mountPath"])
    config_map = by_kind(objects, "ConfigMap")[volumes["merchant-rules"]["configMap"]["name"]]
    assert config_map["metadata"]["name"] == "sluice-merchant-rules"  # no hash: edits reload
    (tmp_path / path.name).write_text(config_map["data"][path.name])
    assert read_rules(tmp_path / path.name).version


@needs_kustomize
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_service_follows_one_catalog_update_log(name: str) -> None:
    """Live catalog updates (docs/features.md): the gateway writes the log and every stage
    reads the same one, or a stage serves pages the gateway's catalog no longer allows until
    the next build; a sharded recall front takes none (its settings refuse them)."""
    objects = overlay(name)
    sources = {}
    for service in SERVICES:
        env = container_env(objects, runner(objects, service))
        sources[service] = env.get(f"SLUICE_{service.upper()}_CATALOG_UPDATES")
    if name.endswith("-sharded"):
        assert sources.pop("recall") is None
    assert len(set(sources.values())) == 1 and None not in sources.values(), sources
    gateway = container_env(objects, runner(objects, "gateway"))
    assert "SLUICE_GATEWAY_CATALOG_API_KEYS" in gateway
