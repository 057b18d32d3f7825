"""deploy/: the Kubernetes, kustomize and Istio manifests, checked against the server's own code.

There is no kubectl or kustomize here, so a small resolver builds each overlay: resources,
strategic-merge patches (for the list fields the patches use), configMapGenerator and
namespace. It refuses any other kustomize feature, so a manifest that outgrows it fails here
instead of being half checked. Secrets are not manifests (no key material in git): the
`kubectl create secret` commands in deploy/README.md are what volumes are checked against.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from envoy.type.v3.http_status_pb2 import StatusCode
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc import health_probe
from extproc.authn.apikey import ApiKeyStore
from extproc.cli import build_parser
from extproc.demo.stack import free_port
from extproc.envoyconf import EnvoyValues, render
from extproc.policy.compile import CompileResources
from extproc.policy.store import load_policy_set
from extproc.server import SERVICES
from extproc.settings import Settings, from_env
from extproc.tls import DECISION_SERVER_SPIFFE_ID, DevPki, ensure_dev_pki, pki_paths

Doc = dict[str, Any]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
ISTIO = DEPLOY / "istio"
OVERLAYS = ("service", "sidecar")
ISTIO_FILES = (
    "mesh-config.yaml",
    "authorization-policy.yaml",
    "envoyfilter-ext-proc.yaml",
    "destination-rule.yaml",
)
SETTING_NAMES = {f"EXTPROC_{f.name.upper()}": f.name for f in fields(Settings)}
HEALTH_NAMES = ("", *SERVICES)

KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ServiceAccount"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("install.istio.io/v1alpha1", "IstioOperator"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"),
    ("networking.istio.io/v1", "DestinationRule"),
}
CLUSTER_SCOPED = {"Namespace"}
KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "patches",
    "configMapGenerator",
}
GENERATOR_KEYS = {"name", "files", "options"}
# Strategic-merge keys of the list fields patches touch, as the Kubernetes API defines them;
# any other list is replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
# What Istio's EnvoyExternalAuthorizationGrpcProvider has (istio/api mesh/v1alpha1/config.proto).
GRPC_PROVIDER_FIELDS = {
    "service",
    "port",
    "timeout",
    "failOpen",
    "statusOnError",
    "includeRequestBodyInCheck",
}


# ---------------------------------------------------------------------------------------------
# the resolver


def load_docs(path: Path) -> list[Doc]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path}: no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value, key) if key in base else value
        return copy.deepcopy(out)
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out_list = list(base)
        for item in patch:
            index = next((i for i, b in enumerate(out_list) if b[key] == item[key]), None)
            if index is None:
                out_list.append(item)
            else:
                out_list[index] = strategic_merge(out_list[index], item)
        return copy.deepcopy(out_list)
    return copy.deepcopy(patch)


def kustomization(directory: Path) -> Doc:
    doc = load_docs(directory / "kustomization.yaml")[0]
    unsupported = set(doc) - KUSTOMIZATION_KEYS
    assert not unsupported, f"{directory}: the test's resolver does not implement {unsupported}"
    assert (doc["apiVersion"], doc["kind"]) == (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    )
    return doc


def generator_sources(directory: Path, generator: Doc) -> dict[str, Path]:
    """configMapGenerator `files`: key -> file (`key=path`, or the file's name)."""
    out = {}
    for entry in generator["files"]:
        key, _, source = entry.rpartition("=")
        out[key or Path(source).name] = directory / source
    return out


def build(directory: Path) -> list[Doc]:
    """What `kustomize build directory` gives, for the features these manifests use (without
    the name hashes of generated ConfigMaps: kustomize renames their references alike)."""
    spec = kustomization(directory)
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs.extend(build(path) if path.is_dir() else load_docs(path))
    for generator in spec.get("configMapGenerator", []):
        assert set(generator) <= GENERATOR_KEYS, generator
        data = {
            k: p.read_text(encoding="utf-8")
            for k, p in generator_sources(directory, generator).items()
        }
        meta = {"name": generator["name"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for patch in spec.get("patches", []):
        assert set(patch) == {"path"}, "only strategic-merge patches from files"
        for change in load_docs(directory / patch["path"]):
            target = one(docs, change["kind"], change["metadata"]["name"])
            docs[docs.index(target)] = strategic_merge(target, change)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    return docs


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def every(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def builds() -> dict[str, list[Doc]]:
    return {overlay: build(KUSTOMIZE / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def istio() -> dict[str, Doc]:
    out = {}
    for name in ISTIO_FILES:
        (doc,) = load_docs(ISTIO / name)
        out[name] = doc
    return out


# ---------------------------------------------------------------------------------------------
# pods, containers, volumes


def pod(deployment: Doc) -> Doc:
    spec: Doc = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: Doc, name: str) -> Doc:
    found: list[Doc] = [c for c in pod(deployment)["containers"] if c["name"] == name]
    assert len(found) == 1, f"one container {name}"
    return found[0]


def extproc(docs: list[Doc]) -> tuple[Doc, Doc]:
    """The Deployment running the decision server, and its container."""
    deployment = one(docs, "Deployment", "extproc")
    return deployment, container(deployment, "extproc")


def env_of(c: Doc) -> dict[str, str]:
    out = {}
    for item in c.get("env", []):
        assert set(item) == {"name", "value"}, f"{item['name']}: only literal values"
        assert isinstance(item["value"], str), f"{item['name']}: env values are strings"
        assert item["name"] not in out, f"{item['name']} twice"
        out[item["name"]] = item["value"]
    return out


def settings_of(c: Doc) -> Settings:
    return from_env(env_of(c))


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pods_selected(docs: list[Doc], selector: dict[str, str]) -> list[Doc]:
    return [
        d
        for d in every(docs, "Deployment")
        if matches(selector, d["spec"]["template"]["metadata"]["labels"])
    ]


def port_value(c: Doc, name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        assert name_or_number in [p["containerPort"] for p in c.get("ports", [])]
        return name_or_number
    (found,) = [p["containerPort"] for p in c.get("ports", []) if p["name"] == name_or_number]
    assert isinstance(found, int)
    return found


def listen_port(address: str) -> int:
    return int(address.rpartition(":")[2])


def readme_secrets() -> dict[tuple[str, str], set[str]]:
    """(namespace, name) -> keys, from the `kubectl create secret` commands in deploy/README.md."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    out: dict[tuple[str, str], set[str]] = {}
    for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if "|" in tokens:
                tokens = tokens[: tokens.index("|")]
            if tokens[:1] != ["kubectl"] or "secret" not in tokens:
                continue
            namespace = tokens[tokens.index("-n") + 1]
            at = tokens.index("secret")
            kind, name = tokens[at + 1], tokens[at + 2]
            keys = {t.split("=")[1] for t in tokens if t.startswith("--from-file=")}
            if kind == "tls":
                keys |= {"tls.crt", "tls.key"}
            out[(namespace, name)] = keys
    return out


def volume_files(docs: list[Doc], namespace: str, volume: Doc) -> set[str] | None:
    """The file names a volume provides (None: a writable emptyDir). Each source must exist:
    a ConfigMap in the build, a Secret created by deploy/README.md, with every item's key."""
    secrets = readme_secrets()

    def from_configmap(source: Doc) -> set[str]:
        data = one(docs, "ConfigMap", source["name"])["data"]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            assert item["key"] in data, f"ConfigMap {source['name']} has no {item['key']}"
        return {i["path"] for i in items}

    def from_secret(name: str, items: list[Doc] | None) -> set[str]:
        keys = secrets.get((namespace, name))
        assert keys is not None, f"Secret {namespace}/{name} is not created in deploy/README.md"
        for item in items or []:
            assert item["key"] in keys, f"Secret {name}: README does not give it {item['key']}"
        return {i["path"] for i in items} if items else keys

    if "emptyDir" in volume:
        return None
    if "configMap" in volume:
        return from_configmap(volume["configMap"])
    if "secret" in volume:
        return from_secret(volume["secret"]["secretName"], volume["secret"].get("items"))
    if "projected" in volume:
        files: set[str] = set()
        for source in volume["projected"]["sources"]:
            if "configMap" in source:
                files |= from_configmap(source["configMap"])
            else:
                files |= from_secret(source["secret"]["name"], source["secret"].get("items"))
        return files
    raise AssertionError(f"volume {volume['name']}: a kind this test does not know")


def mounted(docs: list[Doc], deployment: Doc, c: Doc, path: str) -> tuple[Doc, Doc]:
    """The mount holding `path` in container `c`, and its volume."""
    candidates = [m for m in c.get("volumeMounts", []) if path.startswith(m["mountPath"] + "/")]
    assert candidates, f"{c['name']}: nothing is mounted where {path} is"
    mount = max(candidates, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod(deployment)["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def assert_provided(docs: list[Doc], deployment: Doc, c: Doc, path: str) -> Doc:
    """`path` is a file a read-only Secret or ConfigMap mount provides; returns the volume."""
    mount, volume = mounted(docs, deployment, c, path)
    files = volume_files(docs, deployment["metadata"]["namespace"], volume)
    assert files is not None, f"{path}: on a writable volume, not from a Secret/ConfigMap"
    assert mount.get("readOnly") is True, f"{mount['mountPath']}: mount read-only"
    relative = path[len(mount["mountPath"]) + 1 :]
    assert relative in files, f"{path}: volume {volume['name']} provides only {sorted(files)}"
    return volume


def health_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc")
    health_probe.add_health_command(parser.add_subparsers(dest="command", required=True))
    return parser


# ---------------------------------------------------------------------------------------------
# files, kinds, names


def test_every_kustomization_references_files_that_exist_and_parse() -> None:
    directories = sorted(p.parent for p in KUSTOMIZE.rglob("kustomization.yaml"))
    assert {d.relative_to(KUSTOMIZE).as_posix() for d in directories} == {
        "base",
        "overlays/service",
        "overlays/sidecar",
    }
    for directory in directories:
        spec = kustomization(directory)
        for entry in spec.get("resources", []):
            path = directory / entry
            assert path.is_file() or (path / "kustomization.yaml").is_file(), path
            if path.is_file():
                load_docs(path)
        for patch in spec.get("patches", []):
            load_docs(directory / patch["path"])
        for generator in spec.get("configMapGenerator", []):
            for source in generator_sources(directory, generator).values():
                assert source.is_file(), source
                if source.suffix == ".yaml":
                    load_docs(source)
        build(directory)


def test_every_resource_is_a_known_kind(
    builds: dict[str, list[Doc]], istio: dict[str, Doc]
) -> None:
    docs = [*builds["service"], *builds["sidecar"], *istio.values()]
    for doc in docs:
        assert (doc["apiVersion"], doc["kind"]) in KNOWN_KINDS, (doc["apiVersion"], doc["kind"])
        assert doc["metadata"]["name"]
    for overlay, built in builds.items():
        names = [(d["kind"], d["metadata"]["name"]) for d in built]
        assert len(names) == len(set(names)), f"{overlay}: a kind and name twice"
        for doc in built:
            if doc["kind"] not in CLUSTER_SCOPED:
                assert doc["metadata"]["namespace"] == "extproc", doc["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_names_between_objects_resolve(builds: dict[str, list[Doc]], overlay: str) -> None:
    docs = builds[overlay]
    for deployment in every(docs, "Deployment"):
        template = deployment["spec"]["template"]
        assert matches(
            deployment["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]
        )
        if "serviceAccountName" in template["spec"]:
            one(docs, "ServiceAccount", template["spec"]["serviceAccountName"])
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounts = {
            m["name"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])
        }
        assert mounts == set(volumes), (
            f"{deployment['metadata']['name']}: unused or unknown volumes"
        )
        for volume in volumes.values():
            volume_files(docs, deployment["metadata"]["namespace"], volume)
    for service in every(docs, "Service"):
        (target,) = pods_selected(docs, service["spec"]["selector"])
        for port in service["spec"]["ports"]:
            owners = [
                c
                for c in pod(target)["containers"]
                if any(
                    port["targetPort"] in (p["name"], p["containerPort"])
                    for p in c.get("ports", [])
                )
            ]
            assert len(owners) == 1, f"Service {service['metadata']['name']}: {port['targetPort']}"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for doc in every(docs, kind):
            selector = doc["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"]
            assert pods_selected(docs, selector["matchLabels"]), doc["metadata"]["name"]


def test_readme_secret_commands_use_demo_pki_files() -> None:
    secrets = readme_secrets()
    assert ("extproc", "extproc-server-tls") in secrets
    assert ("istio-system", "extproc-envoy-client") in secrets
    demo = {p.name for p in vars(pki_paths(Path(".run/pki"))).values()}
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for used in re.findall(r"\.run/pki/([\w.-]+)", text):
        assert used in demo, f"README names .run/pki/{used}, which ensure_dev_pki does not write"


# ---------------------------------------------------------------------------------------------
# the server's settings


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_extproc_command_and_settings_are_the_servers(
    builds: dict[str, list[Doc]], overlay: str
) -> None:
    docs = builds[overlay]
    deployment, c = extproc(docs)
    assert c["command"] == ["python", "-m", "extproc"]
    try:
        args = build_parser().parse_args(c["args"])
    except SystemExit:
        pytest.fail(f"`extproc {' '.join(c['args'])}` is not accepted by `extproc serve`")
    assert args.command == "serve"
    env = env_of(c)
    unknown = {n for n in env if n.startswith("EXTPROC_")} - set(SETTING_NAMES)
    assert not unknown, f"not Settings fields: {unknown}"
    settings = settings_of(c)
    # Files come from mounts that only exist in the cluster; every other problem counts.
    problems = [p for p in settings.validate() if not p.endswith(": not a file")]
    assert problems == []
    assert not settings.insecure and settings.tls_cert and settings.tls_key
    assert settings.tls_client_ca
    for path in (
        settings.tls_cert,
        settings.tls_key,
        settings.tls_client_ca,
        settings.api_keys_file,
        settings.audit_key_file,
    ):
        assert path is not None
        volume = assert_provided(docs, deployment, c, str(path))
        assert "secret" in volume, f"{path}: key material comes from a Secret"
    assert settings.audit_log is not None
    mount, volume = mounted(docs, deployment, c, str(settings.audit_log))
    assert "emptyDir" in volume and not mount.get("readOnly"), "the audit log needs a writable dir"
    # Files rotate well before the volume fills (two workers, each a file being written).
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and 0 < 4 * settings.audit_max_bytes < int(limit[:-2]) * 2**30


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_share_the_valkey_service(builds: dict[str, list[Doc]], overlay: str) -> None:
    docs = builds[overlay]
    settings = settings_of(extproc(docs)[1])
    assert settings.workers == 2
    url = urlsplit(settings.quota_store)
    assert url.scheme in ("redis", "valkey") and url.hostname and url.port
    service = one(docs, "Service", url.hostname)
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    (store,) = pods_selected(docs, service["spec"]["selector"])
    assert port_value(pod(store)["containers"][0], port["targetPort"]) == url.port
    # The memory store is refused with two workers: the shared store is what makes it valid.
    memory = from_env(env_of(extproc(docs)[1]) | {"EXTPROC_QUOTA_STORE": "memory"})
    assert any("memory quota store" in p for p in memory.validate())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_policies_come_from_a_watched_read_only_configmap(
    builds: dict[str, list[Doc]], overlay: str, tmp_path: Path
) -> None:
    docs = builds[overlay]
    deployment, c = extproc(docs)
    settings = settings_of(c)
    assert settings.policy_watch_seconds > 0, "the directory must be polled to hot-reload"
    mount, volume = mounted(docs, deployment, c, f"{settings.policy_dir}/x.yaml")
    assert mount["mountPath"] == str(settings.policy_dir) and mount["readOnly"] is True
    configmap = one(docs, "ConfigMap", volume["configMap"]["name"])
    # Updated in place (no name hash), so the mounted files change instead of the pods.
    (generator,) = [
        g
        for g in kustomization(KUSTOMIZE / "base")["configMapGenerator"]
        if g["name"] == configmap["metadata"]["name"]
    ]
    assert generator["options"]["disableNameSuffixHash"] is True
    for name, text in configmap["data"].items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    resources = CompileResources(api_keys=ApiKeyStore.load(tmp_path / "keys.json"), environ={})
    assert load_policy_set(tmp_path, resources).policies


# ---------------------------------------------------------------------------------------------
# ports


def test_grpc_port_agrees_across_service_networkpolicy_and_istio(
    builds: dict[str, list[Doc]], istio: dict[str, Doc]
) -> None:
    docs = builds["service"]
    _, c = extproc(docs)
    settings = settings_of(c)
    host, _, port = settings.listen.rpartition(":")
    assert host == "0.0.0.0", "the service overlay must listen on the pod IP"
    grpc_port = int(port)
    assert port_value(c, "grpc") == grpc_port
    service = one(docs, "Service", "extproc")
    (svc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert port_value(c, svc_port["targetPort"]) == grpc_port
    assert svc_port["appProtocol"] == "grpc"
    fqdn = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"

    (provider,) = istio["mesh-config.yaml"]["spec"]["meshConfig"]["extensionProviders"]
    grpc_provider = provider["envoyExtAuthzGrpc"]
    assert (grpc_provider["service"], grpc_provider["port"]) == (fqdn, svc_port["port"])

    patches = istio["envoyfilter-ext-proc.yaml"]["spec"]["configPatches"]
    (ext_proc,) = [
        p for p in patches if p["patch"]["value"].get("name") == "envoy.filters.http.ext_proc"
    ]
    target = ext_proc["patch"]["value"]["typed_config"]["grpc_service"]["envoy_grpc"]
    assert target["cluster_name"] == f"outbound|{svc_port['port']}||{fqdn}"
    assert target["authority"] == fqdn  # the cluster name's `|` is not a valid :authority

    rule = istio["destination-rule.yaml"]["spec"]
    assert rule["host"] == fqdn
    (level,) = rule["trafficPolicy"]["portLevelSettings"]
    assert level["port"]["number"] == svc_port["port"]

    policy = one(docs, "NetworkPolicy", "extproc")
    reaching = [
        r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": grpc_port} in r["ports"]
    ]
    assert len(reaching) == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_port_agrees_with_annotations_and_services(
    builds: dict[str, list[Doc]], overlay: str
) -> None:
    docs = builds[overlay]
    deployment, c = extproc(docs)
    settings = settings_of(c)
    assert settings.metrics_listen.startswith("0.0.0.0:"), "Prometheus scrapes the pod IP"
    port = listen_port(settings.metrics_listen)
    assert port_value(c, "metrics") == port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    for service in every(docs, "Service"):
        for p in service["spec"]["ports"]:
            if "metrics" in p["name"]:
                assert port_value(c, p["targetPort"]) == port
    (policy,) = [
        n
        for n in every(docs, "NetworkPolicy")
        if pods_selected(docs, n["spec"]["podSelector"]["matchLabels"]) == [deployment]
    ]
    assert any({"protocol": "TCP", "port": port} in r["ports"] for r in policy["spec"]["ingress"])


def test_sidecar_pod_talks_over_loopback(builds: dict[str, list[Doc]]) -> None:
    docs = builds["sidecar"]
    deployment, c = extproc(docs)
    settings = settings_of(c)
    assert settings.listen.rpartition(":")[0] == "127.0.0.1"
    envoy_config = yaml.safe_load(one(docs, "ConfigMap", "envoy-config")["data"]["envoy.yaml"])
    clusters = {cl["name"]: cl for cl in envoy_config["static_resources"]["clusters"]}

    def address(cluster: str) -> tuple[str, int]:
        (endpoint,) = clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        socket_address = endpoint["endpoint"]["address"]["socket_address"]
        return socket_address["address"], socket_address["port_value"]

    assert address("decision_server") == ("127.0.0.1", settings.port)
    # The model: the policy's version cluster, served by the model container's --port.
    model = container(deployment, "model")
    model_port = int(model["args"][model["args"].index("--port") + 1])
    assert "--host" not in model["args"], "the demo pod's default host is loopback"
    assert address("demo-oip-v1") == ("127.0.0.1", model_port)
    # Envoy's listener is the Pod's door: its container port, the Service, the NetworkPolicy.
    (listener,) = envoy_config["static_resources"]["listeners"]
    https = listener["address"]["socket_address"]["port_value"]
    envoy = container(deployment, "envoy")
    assert port_value(envoy, "https") == https
    (gateway_port,) = one(docs, "Service", "extproc-gateway")["spec"]["ports"]
    assert port_value(envoy, gateway_port["targetPort"]) == https
    policy = one(docs, "NetworkPolicy", "extproc-gateway")
    open_to_all = [r for r in policy["spec"]["ingress"] if "from" not in r]
    assert [r["ports"] for r in open_to_all] == [[{"protocol": "TCP", "port": https}]]
    # Nothing exposes the decision server's port.
    for service in every(docs, "Service"):
        for p in service["spec"]["ports"]:
            assert p["targetPort"] not in ("grpc", settings.port)


# ---------------------------------------------------------------------------------------------
# probes, shutdown, security


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_use_grpc_health_over_mtls(builds: dict[str, list[Doc]], overlay: str) -> None:
    docs = builds[overlay]
    deployment, c = extproc(docs)
    settings = settings_of(c)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c[kind]
        # A `grpc:` probe cannot do TLS; the server only accepts mTLS.
        assert set(probe) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"exec"}
        command = probe["exec"]["command"]
        assert command[:3] == ["python", "-m", "extproc"]
        try:
            args = health_parser().parse_args(command[3:])
        except SystemExit:
            pytest.fail(f"{kind}: `extproc health` does not accept {command[3:]}")
        assert args.service in HEALTH_NAMES
        for path in (args.cert, args.key, args.ca):
            assert path is not None, f"{kind}: the server needs the probe's certificate"
            assert "secret" in assert_provided(docs, deployment, c, str(path))
        assert probe["timeoutSeconds"] > health_probe.PROBE_TIMEOUT_SECONDS + 1
        config = health_probe.config_from_args(args, env_of(c))
        assert config.target == f"127.0.0.1:{settings.port}"
        if kind == "livenessProbe":
            assert args.live, "a draining server is alive: liveness takes any answer"
        else:
            # "" is SERVING from the moment the port opens; the names only once ready.
            assert not args.live and args.service in SERVICES


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_drains_within_the_grace_period(
    builds: dict[str, list[Doc]], overlay: str
) -> None:
    deployment, c = extproc(builds[overlay])
    settings = settings_of(c)
    pause = re.fullmatch(
        r"import time; time\.sleep\((\d+)\)", c["lifecycle"]["preStop"]["exec"]["command"][-1]
    )
    assert pause is not None
    budget = pod(deployment)["terminationGracePeriodSeconds"]
    assert int(pause.group(1)) + settings.grace_seconds < budget
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_restricted(builds: dict[str, list[Doc]], overlay: str) -> None:
    docs = builds[overlay]
    assert (
        one(docs, "Namespace", "extproc")["metadata"]["labels"][
            "pod-security.kubernetes.io/enforce"
        ]
        == "restricted"
    )
    deployments = every(docs, "Deployment")
    assert len(deployments) == 2
    for deployment in deployments:
        spec = pod(deployment)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        for volume in spec["volumes"]:
            assert "hostPath" not in volume
            mode = (volume.get("secret") or volume.get("projected") or {}).get("defaultMode")
            if "secret" in volume or "projected" in volume:
                assert mode is not None and mode & 0o007 == 0, f"{volume['name']}: world-readable"
        for c in spec["containers"]:
            where = f"{deployment['metadata']['name']}/{c['name']}"
            context = c["securityContext"]
            assert context["runAsNonRoot"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context.get("privileged") is not True, where
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) == {"cpu", "memory"}, where
            image = c["image"]
            assert ":" in image and not image.endswith(":latest"), where


def test_service_mode_admits_only_the_gateway(
    builds: dict[str, list[Doc]], istio: dict[str, Doc]
) -> None:
    docs = builds["service"]
    deployment, c = extproc(docs)
    grpc_port = settings_of(c).port
    pdb = one(docs, "PodDisruptionBudget", "extproc")
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert pods_selected(docs, pdb["spec"]["selector"]["matchLabels"]) == [deployment]

    policy = one(docs, "NetworkPolicy", "extproc")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and rule.get("ports"), "every rule names peers and ports"
    (rule,) = [
        r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": grpc_port} in r["ports"]
    ]
    (peer,) = rule["from"]
    gateway = istio["authorization-policy.yaml"]["spec"]["selector"]["matchLabels"]
    assert peer["podSelector"]["matchLabels"] == gateway
    assert istio["envoyfilter-ext-proc.yaml"]["spec"]["workloadSelector"]["labels"] == gateway
    namespace = istio["authorization-policy.yaml"]["metadata"]["namespace"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_decision_servers_reach_valkey(builds: dict[str, list[Doc]], overlay: str) -> None:
    docs = builds[overlay]
    policy = one(docs, "NetworkPolicy", "valkey")
    (store,) = pods_selected(docs, policy["spec"]["podSelector"]["matchLabels"])
    assert store["metadata"]["name"] == "valkey"
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}
    allowed = pods_selected(docs, peer["podSelector"]["matchLabels"])
    assert allowed == [extproc(docs)[0]]
    assert rule["ports"] == [
        {"protocol": "TCP", "port": urlsplit(settings_of(extproc(docs)[1]).quota_store).port}
    ]


# ---------------------------------------------------------------------------------------------
# Istio and Envoy against envoy/*.yaml


def rendered_filters(template: str) -> tuple[Doc, dict[str, Doc]]:
    """The rendered template's HTTP connection manager and its HTTP filters by name."""
    values = EnvoyValues(
        listen_address="127.0.0.1",
        listen_port=8443,
        admin_port=9901,
        decision_host="127.0.0.1",
        decision_port=9001,
        sds_dir=Path("/sds"),
        access_log_path=Path("/dev/stdout"),
        chat_v1_port=8101,
        chat_v2_port=8102,
        oip_v1_port=8201,
    )
    config = yaml.safe_load(render(template, values))  # type: ignore[arg-type]
    (listener,) = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm, {f["name"]: f for f in hcm["http_filters"]}


def test_authorization_policy_uses_the_mesh_provider(istio: dict[str, Doc]) -> None:
    providers = istio["mesh-config.yaml"]["spec"]["meshConfig"]["extensionProviders"]
    policy = istio["authorization-policy.yaml"]["spec"]
    assert policy["action"] == "CUSTOM"
    assert policy["provider"]["name"] in [p["name"] for p in providers]
    assert policy["rules"] == [{}], "every request is decided, not only those a rule matches"
    assert istio["authorization-policy.yaml"]["metadata"]["namespace"] == "istio-system"


def test_ext_authz_provider_matches_envoy_ext_authz_yaml(istio: dict[str, Doc]) -> None:
    (provider,) = istio["mesh-config.yaml"]["spec"]["meshConfig"]["extensionProviders"]
    grpc_provider = provider["envoyExtAuthzGrpc"]
    # HTTP-provider fields (includeRequestHeadersInCheck, headersTo*) would be rejected.
    assert set(grpc_provider) <= GRPC_PROVIDER_FIELDS
    _, filters = rendered_filters("ext_authz")
    envoy = filters["envoy.filters.http.ext_authz"]["typed_config"]
    assert grpc_provider["timeout"] == envoy["grpc_service"]["timeout"]
    assert grpc_provider["failOpen"] is envoy["failure_mode_allow"] is False
    assert int(grpc_provider["statusOnError"]) == StatusCode.Value(envoy["status_on_error"]["code"])
    body = envoy["with_request_body"]
    assert grpc_provider["includeRequestBodyInCheck"] == {
        "maxRequestBytes": body["max_request_bytes"],
        "allowPartialMessage": body["allow_partial_message"],
        "packAsBytes": body["pack_as_bytes"],
    }


def _sanitizer(composite: Doc) -> Doc:
    """The ext_proc config the 5xx composite filter delegates to (a copy)."""
    (action,) = composite["xds_matcher"]["matcher_tree"]["exact_match_map"]["map"].values()
    return dict(copy.deepcopy(action["action"]["typed_config"]["typed_config"]["typed_config"]))


def test_envoyfilter_matches_envoy_ext_proc_yaml(istio: dict[str, Doc]) -> None:
    hcm, filters = rendered_filters("ext_proc")
    patches = istio["envoyfilter-ext-proc.yaml"]["spec"]["configPatches"]
    inserted = [p for p in patches if p["applyTo"] == "HTTP_FILTER"]
    for p in inserted:
        assert p["match"]["context"] == "GATEWAY"
        assert p["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == (
            "envoy.filters.http.router"
        )
        assert p["patch"]["operation"] == "INSERT_BEFORE"
    # Inserted before the router in this order, as in the template.
    names = [p["patch"]["value"]["name"] for p in inserted]
    assert names == [n for n in filters if n in names]
    assert names == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_proc",
        "gateway.sanitize_5xx",
    ]

    ext_proc = inserted[1]["patch"]["value"]["typed_config"]
    template = filters["envoy.filters.http.ext_proc"]["typed_config"]
    assert ext_proc["failure_mode_allow"] is False
    assert {k: v for k, v in ext_proc.items() if k != "grpc_service"} == {
        k: v for k, v in template.items() if k != "grpc_service"
    }
    # The 5xx stream goes to the same server, with the same settings as in the template.
    sanitize = _sanitizer(inserted[2]["patch"]["value"]["typed_config"])
    template_sanitize = _sanitizer(filters["gateway.sanitize_5xx"]["typed_config"])
    assert sanitize.pop("grpc_service") == ext_proc["grpc_service"]
    template_sanitize.pop("grpc_service")
    assert sanitize["failure_mode_allow"] is False
    assert sanitize == template_sanitize
    region = copy.deepcopy(inserted[0]["patch"]["value"]["typed_config"])
    expected = copy.deepcopy(filters["envoy.filters.http.header_mutation"]["typed_config"])
    for mutation in (region, expected):
        (append,) = mutation["mutations"]["request_mutations"]
        assert append["append"]["header"]["key"] == "x-gateway-region"
        append["append"]["header"]["value"] = "<region>"
    assert region == expected

    (route_config,) = [p for p in patches if p["applyTo"] == "ROUTE_CONFIGURATION"]
    assert (
        route_config["patch"]["value"]["internal_only_headers"]
        == (hcm["route_config"]["internal_only_headers"])
    )
    (virtual_host,) = [p for p in patches if p["applyTo"] == "VIRTUAL_HOST"]
    (models,) = hcm["route_config"]["virtual_hosts"]
    assert (
        virtual_host["patch"]["value"]["response_headers_to_add"]
        == models["response_headers_to_add"]
    )


def test_destination_rule_does_mtls_with_the_documented_secret(istio: dict[str, Doc]) -> None:
    doc = istio["destination-rule.yaml"]
    (level,) = doc["spec"]["trafficPolicy"]["portLevelSettings"]
    tls = level["tls"]
    assert tls["mode"] == "MUTUAL"
    assert tls["subjectAltNames"] == [DECISION_SERVER_SPIFFE_ID]
    keys = readme_secrets()[(doc["metadata"]["namespace"], tls["credentialName"])]
    assert {"tls.crt", "tls.key", "ca.crt"} <= keys


def load_render_script() -> Any:
    spec = importlib.util.spec_from_file_location("render_envoy", DEPLOY / "render_envoy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sidecar_envoy_config_is_the_rendered_template(builds: dict[str, list[Doc]]) -> None:
    script = load_render_script()
    committed = one(builds["sidecar"], "ConfigMap", "envoy-config")["data"]["envoy.yaml"]
    assert committed == script.rendered(), "run: .venv/bin/python deploy/render_envoy.py"


def test_sidecar_envoy_finds_its_config_and_sds_files(builds: dict[str, list[Doc]]) -> None:
    docs = builds["sidecar"]
    deployment = one(docs, "Deployment", "extproc")
    envoy = container(deployment, "envoy")
    config_path = envoy["args"][envoy["args"].index("-c") + 1]
    assert_provided(docs, deployment, envoy, config_path)
    config = yaml.safe_load(one(docs, "ConfigMap", "envoy-config")["data"]["envoy.yaml"])
    text = yaml.safe_dump(config)
    sds_paths = set(re.findall(r"path: (/\S+\.yaml)", text))
    watched = set(re.findall(r"watched_directory:\n\s+path: (\S+)", text))
    assert sds_paths and len(watched) == 1
    (directory,) = watched
    sds = one(docs, "ConfigMap", "envoy-sds")["data"]
    for path in sds_paths:
        volume = assert_provided(docs, deployment, envoy, path)
        assert "projected" in volume and path.startswith(directory + "/")
        (secret,) = yaml.safe_load(sds[Path(path).name])["resources"]
        assert secret["name"] == Path(path).stem  # the SDS name the template references
        # The certificates sit in the same projected directory: a renewed Secret is a rename
        # there, which is what Envoy's watched_directory reloads on.
        for filename in re.findall(r"filename: (\S+)", yaml.safe_dump(secret)):
            assert filename.startswith(directory + "/")
            assert_provided(docs, deployment, envoy, filename)
    upstream_ca = yaml.safe_load(sds["upstream_ca.yaml"])["resources"][0]
    (san,) = upstream_ca["validation_context"]["match_typed_subject_alt_names"]
    assert san["matcher"]["exact"] == DECISION_SERVER_SPIFFE_ID


# ---------------------------------------------------------------------------------------------
# the health probe itself


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return ensure_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def health_server(pki: DevPki) -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC health service behind the same mTLS as the decision server's."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port(f"127.0.0.1:{free_port()}", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def probe(pki: DevPki, target: str, **changes: Any) -> health_probe.ProbeConfig:
    values: dict[str, Any] = {
        "target": target,
        "cert": pki.envoy_client_cert,
        "key": pki.envoy_client_key,
        "ca": pki.ca_cert,
    }
    return health_probe.ProbeConfig(**(values | changes))


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXT_PROC = "envoy.service.ext_proc.v3.ExternalProcessor"


def test_probe_passes_only_when_serving(
    pki: DevPki, health_server: tuple[str, health.HealthServicer]
) -> None:
    target, servicer = health_server
    assert health_probe.check(probe(pki, target, service=EXT_PROC))[0] == 1  # not registered yet
    servicer.set(EXT_PROC, NOT_SERVING)
    status, message = health_probe.check(probe(pki, target, service=EXT_PROC))
    assert (status, message.endswith("NOT_SERVING")) == (1, True)
    assert health_probe.check(probe(pki, target, service=EXT_PROC, live=True))[0] == 0
    servicer.set(EXT_PROC, SERVING)
    assert health_probe.check(probe(pki, target, service=EXT_PROC)) == (
        0,
        f"{target} service {EXT_PROC!r}: SERVING",
    )
    assert health_probe.check(probe(pki, target, service="no.such.Service"))[0] == 1


def test_probe_fails_without_a_trusted_client_certificate(
    pki: DevPki, health_server: tuple[str, health.HealthServicer]
) -> None:
    target, _ = health_server
    # The callers' CA is not the one the server trusts for Envoy and the probe.
    wrong = probe(pki, target, cert=pki.demo_client_cert, key=pki.demo_client_key)
    assert health_probe.check(wrong)[0] == 1
    assert health_probe.check(probe(pki, target, cert=None))[0] == 1
    status, message = health_probe.check(probe(pki, target, ca=pki.directory / "absent.crt"))
    assert status == 1 and "cannot read" in message


def test_probe_gives_up_within_its_timeout(pki: DevPki) -> None:
    # Refused: at once. Accepted and never answered (a listen backlog): within the deadline.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", free_port()))
        silent.listen(8)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        assert health_probe.check(probe(pki, target), timeout=0.5)[0] == 1
        assert time.monotonic() - start < 1.5
    start = time.monotonic()
    assert health_probe.check(probe(pki, target))[0] == 1
    assert time.monotonic() - start < health_probe.PROBE_TIMEOUT_SECONDS


def test_probe_reads_the_servers_settings(pki: DevPki) -> None:
    assert health_probe.local_target("0.0.0.0:9001") == "127.0.0.1:9001"
    assert health_probe.local_target("[::]:9001") == "[::1]:9001"
    assert health_probe.local_target("127.0.0.1:9001") == "127.0.0.1:9001"
    args = health_parser().parse_args(["health", "--live"])
    config = health_probe.config_from_args(
        args, {"EXTPROC_LISTEN": "0.0.0.0:9100", "EXTPROC_INSECURE": "1"}
    )
    assert (config.target, config.insecure, config.live) == ("127.0.0.1:9100", True, True)
    args = health_parser().parse_args(["health", "--address", "10.0.0.1:1"])
    assert health_probe.config_from_args(args, {}).target == "10.0.0.1:1"
    with pytest.raises(ValueError, match="EXTPROC_WORKERS"):
        health_probe.config_from_args(args, {"EXTPROC_WORKERS": "two"})


def test_probe_command_exit_status(
    pki: DevPki,
    health_server: tuple[str, health.HealthServicer],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target, servicer = health_server
    monkeypatch.setenv("EXTPROC_LISTEN", target)
    flags = ["--cert", str(pki.envoy_client_cert), "--key", str(pki.envoy_client_key)]
    flags += ["--ca", str(pki.ca_cert), "--service", EXT_PROC]
    args = health_parser().parse_args(["health", *flags])
    assert args.func(args) == 1 and EXT_PROC in capsys.readouterr().err
    servicer.set(EXT_PROC, SERVING)
    assert args.func(args) == 0 and "SERVING" in capsys.readouterr().out
    monkeypatch.setenv("EXTPROC_GRACE_SECONDS", "soon")
    assert args.func(args) == 1 and "EXTPROC_GRACE_SECONDS" in capsys.readouterr().err


def test_cli_runs_the_health_command() -> None:
    # The manifests' probes run `python -m extproc health`, i.e. extproc.cli.
    args = build_parser().parse_args(["health", "--live"])
    assert args.func is health_probe.run


def test_probe_against_the_real_server(pki: DevPki, tmp_path: Path) -> None:
    """The readiness semantics the manifests rely on: "" answers SERVING once the port is open,
    the service names only when the server is ready, and the probe passes then."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "m.yaml").write_text(
        "model: m\nroutes: [{path_prefix: /m}]\nversions: [{name: v1, cluster: demo-oip-v1, "
        "default: true}]\nauthentication: [{api_key: {header: x-api-key}}]\n"
        "authorization: {rules: [{name: demo tenant, tenants: [demo]}]}\n",
        encoding="utf-8",
    )
    port = free_port()
    env = {
        **os.environ,
        "EXTPROC_LISTEN": f"127.0.0.1:{port}",
        "EXTPROC_POLICY_DIR": str(policies),
        "EXTPROC_API_KEYS_FILE": str(tmp_path / "keys.json"),
        "EXTPROC_TLS_CERT": str(pki.server_cert),
        "EXTPROC_TLS_KEY": str(pki.server_key),
        "EXTPROC_TLS_CLIENT_CA": str(pki.ca_cert),
        "EXTPROC_GRACE_SECONDS": "0",
    }
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "extproc", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        ready = probe(pki, f"127.0.0.1:{port}", service=EXT_PROC)
        deadline = time.monotonic() + 60
        while health_probe.check(ready)[0] != 0:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        for service in HEALTH_NAMES:
            assert health_probe.check(probe(pki, f"127.0.0.1:{port}", service=service))[0] == 0
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(server.pid, signal.SIGKILL)
                server.wait()
