"""deploy/kubernetes/: the kustomize base, rendered here and validated against a pinned
Kubernetes schema, then checked for what a reviewer would check by hand.

The base is rendered by this file (kubectl is not on CI): its kustomization.yaml holds only
``resources`` and ``labels``, which :func:`render` applies exactly as kustomize does; where
kubectl is installed the rendering is compared with ``kubectl kustomize``. Every document is
validated with kubernetes-validate (offline: it bundles the schemas) against Kubernetes
:data:`KUBERNETES_VERSION`, strict, so a misspelt or misplaced field fails.

Then the behaviour: the probes are the kubelet's gRPC health checks of the plaintext port
``--health-listen`` opens (a container port; none targets the TLS API port, which a kubelet
probe could not speak), timed for the start and the drain; the grace period covers preStop and
``--grace``; the Service is headless and, like the PDB, the HPA and the spread constraint,
selects this Deployment's pods; every flag is a real ``sandbox serve`` flag (the real parser);
every file a flag names is a key of a mounted Secret; every Secret reference and volume exists.
The container's args start a real server with the README's certificate and tokens: a
plaintext grpc.health.v1 Check of its health port, as the kubelet makes, says SERVING, then
NOT_SERVING once SIGTERM starts the drain (a call still in flight), and the port is closed once
the server is gone. The unprivileged component is applied (a JSON patch) and checked the same
way; the README's overlay is rendered by kubectl where it is installed.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

# The test extra has both (PyYAML comes with kubernetes-validate).
kubernetes_validate = pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
UNPRIVILEGED = BASE / "components" / "unprivileged"
README = (ROOT / "README.md").read_text()
#: The oldest Kubernetes the base is for (securityContext.appArmorProfile, the preStop sleep
#: action): the schema every document must pass, strictly.
KUBERNETES_VERSION = "1.30.0"
#: The health service the probes ask about: the server sets it SERVING once it accepts calls
#: (the server-wide "" is SERVING from the start, grpc's default).
PROBED_SERVICE = "sandbox.v1.Sandbox"
#: The capabilities strict isolation needs (deployment.yaml says what each is for).
CAPABILITIES = {"SYS_ADMIN", "SYS_CHROOT", "SETUID", "SETGID", "SETPCAP", "DAC_OVERRIDE",
                "SYS_NICE", "KILL"}
Doc = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Rendering

def _load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(base: Path = BASE) -> list[Doc]:
    """The base as ``kubectl kustomize`` renders it: its resources in order, each labelled."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "labels"}
    assert not unsupported, (f"kustomization.yaml uses {sorted(unsupported)}, which this "
                             "test's renderer does not apply: keep those in overlays")
    docs = [d for resource in kustomization["resources"] for d in _load(base / resource)]
    for entry in kustomization.get("labels", []):
        assert not entry.get("includeSelectors") and not entry.get("includeTemplates"), \
            "labels that reach selectors or templates are not rendered here"
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    return docs


def kubectl_render(directory: Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _unescape_pointer(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def json_patch(doc: Doc, operations: list[Doc]) -> Doc:
    """RFC 6902 (add, remove, replace, test) on a copy of ``doc``."""
    doc = copy.deepcopy(doc)
    for op in operations:
        *parents, last = [_unescape_pointer(t) for t in op["path"].split("/")[1:]]
        node: Any = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        key: Any = last if isinstance(node, dict) else (len(node) if last == "-" else int(last))
        kind = op["op"]
        if kind == "test":
            assert node[key] == op["value"], f"test {op['path']}: {node[key]!r}"
        elif kind == "remove":
            del node[key]
        elif kind == "replace":
            assert key in node if isinstance(node, dict) else key < len(node), op["path"]
            node[key] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(node, list):
                node.insert(key, copy.deepcopy(op["value"]))
            else:
                node[key] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"unsupported op {kind}")
    return doc


def render_unprivileged() -> list[Doc]:
    """The base with components/unprivileged applied (its one JSON patch, on the Deployment)."""
    component = yaml.safe_load((UNPRIVILEGED / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert set(component) == {"apiVersion", "kind", "patches"}
    docs = render()
    for patch in component["patches"]:
        target = patch["target"]
        operations = yaml.safe_load((UNPRIVILEGED / patch["path"]).read_text())
        for i, doc in enumerate(docs):
            if doc["kind"] == target["kind"] and doc["metadata"]["name"] == target["name"]:
                docs[i] = json_patch(doc, operations)
    return docs


BASE_DOCS = render()


@pytest.fixture
def docs() -> list[Doc]:
    return copy.deepcopy(BASE_DOCS)


# ---------------------------------------------------------------------------------------------
# The pod template, and the flags of its server

def _pod(docs: list[Doc]) -> Doc:
    return _one(docs, "Deployment")["spec"]["template"]


def _container(docs: list[Doc]) -> Doc:
    (container,) = _pod(docs)["spec"]["containers"]
    return container


def _flags(args: list[str]) -> dict[str, list[str]]:
    """``--flag=value`` (and bare ``--flag``) items of ``args`` by flag."""
    flags: dict[str, list[str]] = {}
    for item in args:
        assert item.startswith("--"), f"{item!r}: write each flag as --flag=value"
        name, _, value = item.partition("=")
        flags.setdefault(name, []).append(value)
    return flags


def _flag(container: Doc, name: str) -> str:
    (value,) = _flags(container["args"])[name]
    return value


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _container_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def _probes(container: Doc) -> dict[str, Doc]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
            if kind in container}


def _serve_parser() -> Any:
    import argparse

    from sandbox.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["serve"]


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command and args ($$ escapes a $)."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def _mounted_file(docs: list[Doc], path: str) -> tuple[Doc, str]:
    """The Secret and key behind the file ``path`` of the container (via its volume mount)."""
    container, pod = _container(docs), _pod(docs)
    mounts = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is in no volume mount"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    name = path[len(mount["mountPath"]) + 1:]
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "secret" in volume, f"{path} is on volume {volume['name']}, not a Secret"
    items = volume["secret"].get("items")
    if items is not None:
        keys = [i["key"] for i in items if i["path"] == name]
        assert keys, f"{path}: no item of volume {volume['name']} is {name!r}"
        name = keys[0]
    secret = _one(docs, "Secret", volume["secret"]["secretName"])
    return secret, name


def _secret_keys(secret: Doc) -> set[str]:
    return set(secret.get("data") or {}) | set(secret.get("stringData") or {})


# ---------------------------------------------------------------------------------------------
# Rendering and schema

def test_the_base_has_each_resource_once(docs: list[Doc]) -> None:
    assert sorted(_key(d) for d in docs) == sorted([
        ("ServiceAccount", "sandbox"), ("Secret", "sandbox"), ("Secret", "sandbox-tls"),
        ("Deployment", "sandbox"), ("Service", "sandbox"), ("PodDisruptionBudget", "sandbox"),
        ("HorizontalPodAutoscaler", "sandbox")])
    for doc in docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sandbox"


def test_rendering_matches_kubectl_kustomize(docs: list[Doc]) -> None:
    theirs = kubectl_render(BASE)
    assert sorted(map(_key, theirs)) == sorted(map(_key, docs))
    ours = {_key(d): d for d in docs}
    for doc in theirs:
        assert doc == ours[_key(doc)], _key(doc)


@pytest.mark.parametrize("key", [_key(d) for d in BASE_DOCS], ids="/".join)
def test_each_document_validates_strictly_against_the_pinned_schema(key: tuple[str, str]
                                                                     ) -> None:
    (doc,) = [d for d in BASE_DOCS if _key(d) == key]
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == "1.30"


def test_the_validation_is_strict_and_offline(docs: list[Doc]) -> None:
    """The schemas ship with kubernetes-validate (nothing is fetched), and strict mode refuses
    a field the schema does not know, where a misspelling would otherwise pass."""
    deployment = _one(docs, "Deployment")
    _container(docs)["securityContext"]["capabilites"] = {"add": ["SYS_ADMIN"]}  # sic
    with pytest.raises(kubernetes_validate.ValidationError, match="capabilites"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    # Newer fields fail against the pinned version: the pin is what the base promises.
    hpa = _one(docs, "HorizontalPodAutoscaler")
    hpa["spec"]["behavior"] = {"scaleUp": {"tolerance": "0.05"}}  # Kubernetes 1.33
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------------------------------------
# Probes and shutdown

def test_the_probes_are_grpc_checks_of_the_health_port(docs: list[Doc]) -> None:
    """Every probe is the kubelet's own gRPC health check, on the port --health-listen opens
    (which must be a container port), of the service the server sets SERVING."""
    from sandbox.server import SERVICE_NAME

    container = _container(docs)
    health = _flag(container, "--health-listen")
    # The kubelet dials the pod's IP, not loopback.
    assert health.rsplit(":", 1)[0] == "0.0.0.0"
    ports = [p for p in container["ports"] if p["containerPort"] == _port(health)]
    assert len(ports) == 1, f"--health-listen={health} is not a container port"
    assert ports[0]["name"] == "health" and ports[0]["protocol"] == "TCP"
    probes = _probes(container)
    assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    assert PROBED_SERVICE == SERVICE_NAME
    for kind, probe in probes.items():
        handlers = set(probe) & {"exec", "tcpSocket", "httpGet", "grpc"}
        assert handlers == {"grpc"}, f"{kind}: {sorted(handlers)}"
        assert probe["grpc"]["port"] == _port(health), kind
        assert probe["grpc"].get("service", "") == PROBED_SERVICE, kind


def test_no_grpc_probe_targets_the_tls_api_port(docs: list[Doc]) -> None:
    """The kubelet's gRPC probe is plaintext only: against the TLS API port it never passes."""
    container = _container(docs)
    assert "--tls-cert" in _flags(container["args"])
    listen = _port(_flag(container, "--listen"))
    assert _port(_flag(container, "--health-listen")) != listen
    for kind, probe in _probes(container).items():
        assert probe["grpc"]["port"] != listen, f"{kind}: a kubelet gRPC probe cannot speak TLS"


def test_the_health_port_is_for_the_kubelet_only(docs: list[Doc]) -> None:
    """Clients have no use for the plaintext health port: the Service does not offer it."""
    container, service = _container(docs), _one(docs, "Service")
    health = _port(_flag(container, "--health-listen"))
    for port in service["spec"]["ports"]:
        assert port["port"] != health
        assert _container_port(container, port["targetPort"]) != health, port["name"]


def test_the_probe_timing_fits_the_start_and_the_drain(docs: list[Doc]) -> None:
    container = _container(docs)
    probes = _probes(container)
    grace = float(_flag(container, "--grace"))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]

    def window(probe: Doc) -> int:  # failures in a row before the kubelet acts (defaults)
        return int(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3))

    # The health port opens once every zygote has started and the store is loaded.
    assert window(probes["startupProbe"]) >= 60
    # NOT_SERVING from the drain's first moment: the pod is unready well within its grace.
    assert window(probes["readinessProbe"]) < grace
    # A drain never looks like a wedged server, and one slow answer restarts nothing.
    assert window(probes["livenessProbe"]) > pre_stop + grace
    assert probes["livenessProbe"].get("failureThreshold", 3) >= 3
    for kind, probe in probes.items():
        # The default (1 s) is short for a pod whose CPUs are busy giving birth to workers.
        assert probe.get("timeoutSeconds", 1) >= 2, kind
        assert probe.get("successThreshold", 1) == 1, kind


def test_no_probe_script_is_left_and_the_image_exposes_the_ports(docs: list[Doc]) -> None:
    """The kubelet's probes need nothing in the image: the old exec probe's script is gone."""
    assert not (ROOT / "deploy" / "healthcheck.py").exists()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
    assert "healthcheck" not in dockerfile and "healthcheck" not in ignore
    (expose,) = re.findall(r"^EXPOSE (.*)$", dockerfile, re.M)
    assert {p["containerPort"] for p in _container(docs)["ports"]} == set(map(int, expose.split()))


def test_termination_grace_covers_prestop_and_the_servers_grace(docs: list[Doc]) -> None:
    pod, container = _pod(docs), _container(docs)
    grace = float(_flag(container, "--grace"))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The runtime's own close after the drain takes up to a second more; keep 5 s spare.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + grace + 5


# ---------------------------------------------------------------------------------------------
# Selection: Service, PDB, HPA, spread

def test_the_service_is_headless_and_selects_the_pods(docs: list[Doc]) -> None:
    service, container = _one(docs, "Service"), _container(docs)
    labels = _pod(docs)["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == _port(_flag(container, "--listen"))
    assert _container_port(container, ports["grpc"]["targetPort"]) == ports["grpc"]["port"]
    metrics = _port(_flag(container, "--metrics-listen"))
    assert _container_port(container, ports["metrics"]["targetPort"]) == metrics


def test_the_deployment_pdb_and_spread_select_the_pods(docs: list[Doc]) -> None:
    deployment, labels = _one(docs, "Deployment"), _pod(docs)["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"],
                 _one(docs, "PodDisruptionBudget")["spec"]["selector"],
                 *(c["labelSelector"] for c in
                   _pod(docs)["spec"].get("topologySpreadConstraints", []))]
    for selector in selectors:
        assert set(selector) == {"matchLabels"}
        assert selector["matchLabels"].items() <= labels.items()
    assert _one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_the_hpa_scales_the_deployment_on_cpu(docs: list[Doc]) -> None:
    hpa, deployment = _one(docs, "HorizontalPodAutoscaler"), _one(docs, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # Utilization is of the request: without one the HPA cannot compute it.
    assert "cpu" in _container(docs)["resources"]["requests"]
    # The HPA owns the count: a replicas field would be put back at every apply.
    assert "replicas" not in deployment["spec"]


# ---------------------------------------------------------------------------------------------
# The server's command line

def test_every_arg_is_a_real_sandbox_serve_flag(docs: list[Doc]) -> None:
    container = _container(docs)
    parser = _serve_parser()
    known = set(parser._option_string_actions)
    for flag in _flags(container["args"]):
        assert flag in known, f"{flag} is not a flag of sandbox serve"
    env = {e["name"]: f"<{e['name']}>" for e in container["env"]}
    expanded = [_expand(a, env) for a in container["args"]]
    assert not [a for a in expanded if "$(" in a], "an arg refers to an undefined variable"
    try:
        args = parser.parse_args(expanded)
    except SystemExit as exc:  # argparse's way of saying a value is invalid
        raise AssertionError(f"sandbox serve refuses these args: {expanded}") from exc
    assert args.node_name == "<SANDBOX_NODE_NAME>"
    assert args.isolation == "strict"


def test_the_command_becomes_sandbox_serve_with_the_args(docs: list[Doc]) -> None:
    command = _container(docs)["command"]
    assert command[:2] == ["/bin/sh", "-c"] and len(command) == 4
    script = command[2]
    assert script.strip().splitlines()[-1] == 'exec sandbox serve "$@"'
    # Kubernetes would expand (or mangle) these before the shell sees them.
    assert "$(" not in script and "$$" not in script


def test_the_listen_address_is_secured(docs: list[Doc]) -> None:
    from sandbox.errors import ConfigurationError
    from sandbox.security import check_listen

    flags = _flags(_container(docs)["args"])
    (listen,) = flags["--listen"]
    assert "--insecure" not in flags
    check_listen(listen, tls="--tls-cert" in flags and "--tls-key" in flags,
                 auth="--auth-tokens" in flags, insecure=False)
    with pytest.raises(ConfigurationError):  # what the policy would say without them
        check_listen(listen, tls=False, auth=False, insecure=False)


def test_the_store_url_comes_from_the_secret_through_the_environment(docs: list[Doc],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    container = _container(docs)
    assert "--store" not in _flags(container["args"]), "the URL's password would show in ps"
    (store,) = [e for e in container["env"] if e["name"] == "SANDBOX_STORE"]
    ref = store["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _secret_keys(_one(docs, "Secret", ref["name"]))
    if "--store" not in _serve_parser()._option_string_actions:
        pytest.skip("this sandbox serve has no --store yet")
    monkeypatch.setenv("SANDBOX_STORE", "postgresql://u:p@db/sandbox")
    assert _serve_parser().parse_args([]).store == "postgresql://u:p@db/sandbox"


def test_the_store_url_never_reaches_a_zygote_or_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox import zygote

    monkeypatch.setenv("SANDBOX_STORE", "postgresql://u:secret@db/sandbox")
    assert "SANDBOX_STORE" not in zygote.ENVIRONMENT_NAMES
    assert "secret" not in repr(zygote.environment("instance"))


def test_the_node_name_is_the_pod_name(docs: list[Doc]) -> None:
    container = _container(docs)
    assert _flag(container, "--node-name") == "$(SANDBOX_NODE_NAME)"
    (env,) = [e for e in container["env"] if e["name"] == "SANDBOX_NODE_NAME"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_pool_is_sized_for_the_pod(docs: list[Doc]) -> None:
    """os.cpu_count() in a container is the node's: --workers and --max-idle are explicit, and
    the memory limit holds --workers calls at their memory maximum, plus room for the rest."""
    from sandbox.limits import parse_size

    container = _container(docs)
    flags = _flags(container["args"])
    workers = int(_flag(container, "--workers"))
    assert "--max-idle" in flags
    (per_call,) = [parse_size(v.split("=", 1)[1]) for v in flags["--max-limit"]
                   if v.startswith("memory_bytes=")]
    limit = parse_size(container["resources"]["limits"]["memory"])  # "3Gi"
    assert limit >= workers * per_call + 512 * 2**20
    assert 2 <= workers // int(container["resources"]["requests"]["cpu"]) <= 8


# ---------------------------------------------------------------------------------------------
# Secrets and volumes

def test_every_file_a_flag_names_is_a_key_of_a_mounted_secret(docs: list[Doc]) -> None:
    flags = _flags(_container(docs)["args"])
    for flag in ("--tls-cert", "--tls-key", "--auth-tokens", "--tls-client-ca"):
        for path in flags.get(flag, []):
            secret, key = _mounted_file(docs, path)
            assert key in _secret_keys(secret), f"{flag}={path}: no key {key!r}"


def test_every_secret_reference_exists(docs: list[Doc]) -> None:
    container, pod = _container(docs), _pod(docs)
    for env in container["env"]:
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["key"] in _secret_keys(_one(docs, "Secret", ref["name"])), env["name"]
    for volume in pod["spec"]["volumes"]:
        if "secret" in volume:
            secret = _one(docs, "Secret", volume["secret"]["secretName"])
            for item in volume["secret"].get("items", []):
                assert item["key"] in _secret_keys(secret), item


def test_every_mount_has_its_volume_and_every_volume_is_mounted(docs: list[Doc]) -> None:
    container, pod = _container(docs), _pod(docs)
    volumes = [v["name"] for v in pod["spec"]["volumes"]]
    mounts = [m["name"] for m in container["volumeMounts"]]
    assert len(set(volumes)) == len(volumes)
    assert sorted(set(mounts)) == sorted(volumes)


def test_what_the_server_writes_is_on_a_volume(docs: list[Doc]) -> None:
    """The root filesystem is read-only: the state dir, the bundle directory (/var/tmp) and
    /tmp are emptyDirs."""
    container, pod = _container(docs), _pod(docs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    kinds = {v["name"]: set(v) - {"name"} for v in pod["spec"]["volumes"]}
    writable = {m["mountPath"] for m in container["volumeMounts"]
                if not m.get("readOnly") and kinds[m["name"]] == {"emptyDir"}}
    assert {_flag(container, "--state-dir"), "/var/tmp", "/tmp"} <= writable


def test_the_secrets_hold_placeholders_only(docs: list[Doc]) -> None:
    for secret in (d for d in docs if d["kind"] == "Secret"):
        assert "data" not in secret
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, f"{secret['metadata']['name']}/{key}"


def test_no_api_token_is_mounted(docs: list[Doc]) -> None:
    assert _one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    spec = _pod(docs)["spec"]
    assert spec["serviceAccountName"] == "sandbox"
    assert spec["automountServiceAccountToken"] is False


# ---------------------------------------------------------------------------------------------
# The security context

def test_the_security_context_is_exactly_what_isolation_needs(docs: list[Doc]) -> None:
    sc = _container(docs)["securityContext"]
    assert sc["privileged"] is False
    assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == CAPABILITIES
    assert len(sc["capabilities"]["add"]) == len(CAPABILITIES)
    # Refused by the API together with CAP_SYS_ADMIN.
    assert sc["allowPrivilegeEscalation"] is True
    assert sc["seccompProfile"] == {"type": "Unconfined"}
    assert sc["appArmorProfile"] == {"type": "Unconfined"}
    assert "procMount" not in sc
    spec = _pod(docs)["spec"]
    for shared in ("hostPID", "hostIPC", "hostNetwork", "shareProcessNamespace"):
        assert not spec.get(shared), shared


def test_the_capability_list_matches_its_comment() -> None:
    """deployment.yaml explains each capability: no explanation without the capability, no
    capability without its explanation."""
    text = (BASE / "deployment.yaml").read_text()
    comment = text.split("securityContext:\n", 1)[1].split("runAsUser:", 1)[0]
    explained = set(re.findall(r"^ +#   ([A-Z_]+(?:,[A-Z_]+)?) ", comment, re.M))
    assert {c for e in explained for c in e.split(",")} == CAPABILITIES


def test_the_cgroupfs_remount_makes_every_cgroup_mount_writable(docs: list[Doc],
                                                                tmp_path: Path) -> None:
    """The command's remount loop, run for real in a private mount namespace in which every
    cgroup mount was made read-only first (as a container runtime mounts them)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    mountinfo = Path("/proc/self/mountinfo").read_text()
    if not re.search(r" - cgroup2? ", mountinfo):
        pytest.skip("no cgroup filesystem mounted here")
    first = re.search(r"^(?:\S+ ){4}(\S+) .* - cgroup2? ", mountinfo, re.M)
    assert first is not None
    can = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && "
                          f"mount -o remount,bind,ro {first.group(1)}"],
                         capture_output=True, timeout=60)
    if can.returncode != 0:
        pytest.skip(f"cannot remount in a private mount namespace here: {can.stderr!r}")
    wrapper = _container(docs)["command"][2].replace(
        'exec sandbox serve "$@"', "exec cat /proc/self/mountinfo")
    (tmp_path / "wrapper.sh").write_text(wrapper)
    (tmp_path / "run.sh").write_text(
        "set -e\n"
        "mount --make-rprivate /\n"
        "grep -E ' - cgroup2? ' /proc/self/mountinfo | cut -d' ' -f5 | "
        "while read -r m; do mount -o remount,bind,ro \"$m\"; done\n"
        "grep -E ' - cgroup2? ' /proc/self/mountinfo | cut -d' ' -f6 | grep -q '^ro'\n"
        f"exec sh {tmp_path / 'wrapper.sh'} sandbox-serve\n")
    out = subprocess.run(["unshare", "-m", "sh", str(tmp_path / "run.sh")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cgroup_lines = [line for line in out.stdout.splitlines()
                    if re.search(r" - cgroup2? ", line)]
    assert cgroup_lines
    for line in cgroup_lines:
        assert line.split()[5].split(",")[0] == "rw", line
    assert "cannot make" not in out.stderr


# ---------------------------------------------------------------------------------------------
# The args start a real server, and the liveness probe checks it

@pytest.fixture(scope="module")
def pod_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files of the pod's Secrets, made by the README's commands (a CA, a certificate for
    the Service's names, a tokens file), under the keys the Secrets give them; and
    ``admin-token``, the token whose hash the README's tokens file holds."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pod-secrets")
    blocks = [textwrap.dedent(b) for b in re.findall(r"```\n(.*?)```", _readme_section(), re.S)]
    (commands,) = [b for b in blocks if "openssl req -x509" in b]
    assert "TOKEN=" in commands
    subprocess.run(["bash", "-euo", "pipefail", "-c",
                    commands + '\nprintf %s "$TOKEN" > admin-token\n'],
                   cwd=d, check=True, capture_output=True, timeout=60)
    overlay = yaml.safe_load(_readme_overlay())
    for generator in overlay["secretGenerator"]:
        for item in generator["files"]:
            key, _, name = item.partition("=")
            shutil.copy(d / name, d / key)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_here(docs: list[Doc], secrets: Path, tmp: Path, port: int, health_port: int
             ) -> list[str]:
    """The container's args with the pod's paths made local: the Secrets' files from
    ``secrets``, the volumes under ``tmp``, loopback addresses (``port`` for the API,
    ``health_port`` for the health service, any free one for metrics)."""
    addresses = {"--listen": f"127.0.0.1:{port}", "--health-listen": f"127.0.0.1:{health_port}",
                 "--metrics-listen": "127.0.0.1:0"}
    args = []
    for item in _container(docs)["args"]:
        flag, _, value = item.partition("=")
        value = _expand(value, {"SANDBOX_NODE_NAME": "sandbox-7d9f-abcde"})
        if value.startswith("/etc/sandbox/"):
            value = str(secrets / Path(value).name)
        elif value.startswith("/var/lib/sandbox"):
            value = str(tmp / "state")
        elif flag in addresses:
            value = addresses[flag]
        elif flag == "--isolation" and os.geteuid() != 0:
            value = "best-effort"  # strict needs root; as root the pod's value is used
        args += [flag, value]
    return args


#: Streams "running" once it runs, then sleeps: a call in flight across the drain.
TICK = "import time\n\ndef handler(event, context):\n    yield 'running'\n    time.sleep(event)\n"


def test_the_args_start_a_server_whose_health_port_the_probes_read(
        docs: list[Doc], pod_secrets: Path, tmp_path: Path) -> None:
    """What the kubelet's probes see, with its own means: a plaintext grpc.health.v1 Check of
    the health port (the real stub), SERVING while the server serves, NOT_SERVING from the
    first moment of the drain (a call still in flight), then a closed port."""
    import grpc
    from grpc_conftest import ServerProcess
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from sandbox._proto.sandbox.v1 import sandbox_pb2 as pb
    from sandbox._proto.sandbox.v1 import sandbox_pb2_grpc as pb_grpc
    from sandbox.client import Client

    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    request = health_pb2.HealthCheckRequest(
        service=_container(docs)["readinessProbe"]["grpc"].get("service", ""))
    port, health_port = _free_port(), _free_port()
    args = _as_here(docs, pod_secrets, tmp_path, port, health_port)
    # (--log-level info: the JSON "listening" line names the node; the pod logs at info too)
    server = ServerProcess(tmp_path / "state", *args, "--log-level", "info",
                           stderr=tmp_path / "server.log")
    try:
        assert server.port == port
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(request, timeout=10).status == serving
            # Health alone there: no function can be reached without TLS and a token.
            with pytest.raises(grpc.RpcError) as alone:
                pb_grpc.SandboxStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
            assert alone.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # The API port is TLS: the same probe there fails, which is why the port above is.
            with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
                with pytest.raises(grpc.RpcError) as tls:
                    health_pb2_grpc.HealthStub(plain).Check(request, timeout=10)
                assert tls.value.code() == grpc.StatusCode.UNAVAILABLE
            # A client of the Service (the certificate names it), a call in flight.
            token = (pod_secrets / "admin-token").read_text()
            with Client(f"127.0.0.1:{port}", tls_ca=pod_secrets / "ca.crt", token=token,
                        tls_server_name="sandbox.sandbox.svc.cluster.local",
                        timeout=60) as client:
                client.deploy("tick", TICK)
                running = client.stream("tick", 120)
                assert next(iter(running)) == "running"
                watch = health.Watch(request, timeout=60)
                try:
                    assert next(watch).status == serving
                    server.terminate()
                    assert next(watch).status == not_serving
                finally:
                    watch.cancel()
                # A probe during the drain: NOT_SERVING while the call still runs (--grace).
                assert health.Check(request, timeout=10).status == not_serving
                running.cancel()
            assert server.wait() == 0
            # Gone: the health port is closed.
            with pytest.raises(grpc.RpcError) as closed:
                health.Check(request, timeout=10)
            assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert '"node": "sandbox-7d9f-abcde"' in log or '"node":"sandbox-7d9f-abcde"' in log


# ---------------------------------------------------------------------------------------------
# The unprivileged component

@pytest.fixture
def unprivileged() -> list[Doc]:
    return render_unprivileged()


@pytest.mark.parametrize("key", [_key(d) for d in BASE_DOCS], ids="/".join)
def test_the_unprivileged_variant_validates(unprivileged: list[Doc], key: tuple[str, str]
                                            ) -> None:
    (doc,) = [d for d in unprivileged if _key(d) == key]
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_unprivileged_variant_holds_no_capability(unprivileged: list[Doc]) -> None:
    container, spec = _container(unprivileged), _pod(unprivileged)["spec"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False
    # A masked /proc makes every worker's birth fail (README.md, "On Kubernetes").
    assert sc["procMount"] == "Unmasked" and spec["hostUsers"] is False
    assert container["command"] == ["sandbox", "serve"]
    args = _serve_parser().parse_args(
        [_expand(a, {"SANDBOX_NODE_NAME": "n"}) for a in container["args"]])
    assert args.isolation == "best-effort"
    # The Secrets' files (0440) are readable through the pod's group.
    assert spec["securityContext"]["fsGroup"] == sc["runAsGroup"]
    for volume in spec["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o040
    # Everything else is the base's.
    base = _container(BASE_DOCS)
    for field in ("env", "ports", "volumeMounts", "startupProbe", "livenessProbe",
                  "readinessProbe", "resources"):
        assert container[field] == base[field], field
    assert [a for a in container["args"] if not a.startswith("--isolation=")] == \
        [a for a in base["args"] if not a.startswith("--isolation=")]


def test_the_unprivileged_rendering_matches_kubectl_kustomize(unprivileged: list[Doc],
                                                              tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(BASE, overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources:\n  - {base}\ncomponents:\n  - {base}/components/unprivileged\n")
    theirs = {_key(d): d for d in kubectl_render(overlay)}
    assert theirs == {_key(d): d for d in unprivileged}


# ---------------------------------------------------------------------------------------------
# The README's walk-through

def _readme_section() -> str:
    section = README.split("## On Kubernetes", 1)[1]
    return re.split(r"\n#{2,3} ", section, maxsplit=1)[0]


def _readme_overlay() -> str:
    # The walk-through is a numbered list: its code blocks are indented.
    blocks = [textwrap.dedent(b) for b in re.findall(r"```\n(.*?)```", _readme_section(), re.S)]
    (block,) = [b for b in blocks if "secretGenerator:" in b]
    match = re.search(r"<<'EOF'\n(.*?)\nEOF\n", block, re.S)
    assert match is not None, "the overlay is written with cat > kustomization.yaml <<'EOF'"
    return match.group(1)


def test_the_readme_overlay_replaces_every_placeholder(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    text = _readme_overlay()
    base_line = re.search(r"^  - (\S*deploy/kubernetes)\b.*$", text, re.M)
    assert base_line is not None
    text = text.replace(base_line.group(1), os.path.relpath(BASE, overlay))
    (overlay / "kustomization.yaml").write_text(text)
    for name in re.findall(r"=([\w.-]+\.(?:txt|pem|key))\b", text):
        (overlay / name).write_text(f"content of {name}\n")
    rendered = kubectl_render(overlay)
    assert sorted(map(_key, rendered)) == sorted(map(_key, BASE_DOCS))
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert doc["metadata"]["namespace"] == "sandbox"
        assert "REPLACE-ME" not in yaml.safe_dump(doc), _key(doc)
    for secret in (d for d in rendered if d["kind"] == "Secret"):
        base_secret = _one(BASE_DOCS, "Secret", secret["metadata"]["name"])
        assert set(secret["data"]) == _secret_keys(base_secret)
        assert secret["type"] == base_secret["type"]
    assert _container(rendered)["image"] != _container(BASE_DOCS)["image"]


def test_the_readme_names_the_client_target_of_the_service() -> None:
    section = _readme_section()
    service = _one(BASE_DOCS, "Service")
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    assert f"dns:///{service['metadata']['name']}.sandbox.svc.cluster.local:{port}" in section
    for capability in CAPABILITIES:
        assert f"`{capability}`" in section, capability

