"""deploy/: the Kubernetes manifests parse and grant exactly what the code calls; the unit and image recipe hold together.

Schema-level checks (no cluster here): every document has the fields its
kind requires, the ClusterRole grants the resources `dataplane.sync.kube`
requests (`API_CALLS`) with read verbs only, and the DaemonSet runs the
daemon as the issue asks (host network, NET_ADMIN only, probes on /healthz).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dataplane.cli import _parser
from dataplane.sync.kube import API_CALLS

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "dataplane.service"
READ_VERBS = {"get", "list", "watch"}


def documents() -> list[dict]:
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        found += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return found


def one(kind: str) -> dict:
    matches = [d for d in documents() if d["kind"] == kind]
    assert len(matches) == 1, f"{kind}: {len(matches)} documents"
    return matches[0]


REQUIRED = {
    "ConfigMap": ("v1", ["metadata.name", "metadata.namespace", "data"]),
    "ServiceAccount": ("v1", ["metadata.name", "metadata.namespace"]),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", ["metadata.name", "rules"]),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", ["metadata.name", "roleRef.kind", "roleRef.name",
                                                            "roleRef.apiGroup", "subjects"]),
    "DaemonSet": ("apps/v1", ["metadata.name", "metadata.namespace", "spec.selector.matchLabels",
                              "spec.template.metadata.labels", "spec.template.spec.containers"]),
}


def field(obj: dict, path: str):
    for part in path.split("."):
        obj = obj[part]
    return obj


@pytest.mark.parametrize("kind", REQUIRED)
def test_each_manifest_has_its_kinds_required_fields(kind):
    api_version, paths = REQUIRED[kind]
    obj = one(kind)
    assert obj["apiVersion"] == api_version
    for path in paths:
        assert field(obj, path), f"{kind}: {path} is empty"


def test_only_the_expected_kinds_and_kustomization_lists_every_file():
    assert sorted(d["kind"] for d in documents()) == sorted(REQUIRED)
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_the_cluster_role_grants_exactly_the_resources_the_code_calls_read_only():
    granted = {(group, resource): set(rule["verbs"])
               for rule in one("ClusterRole")["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    called: dict[tuple[str, str], set[str]] = {}
    for resource, verb in API_CALLS:
        called.setdefault((resource.group, resource.plural), set()).add(verb)
    assert set(granted) == set(called), "every resource called is granted, and nothing else"
    for key, verbs in called.items():
        assert verbs <= granted[key], f"{key}: {verbs - granted[key]} not granted"
        assert granted[key] <= READ_VERBS, f"{key}: write verbs granted: {granted[key] - READ_VERBS}"
    assert not any("resourceNames" in rule or "nonResourceURLs" in rule for rule in one("ClusterRole")["rules"])


def test_the_binding_ties_the_daemonsets_service_account_to_the_role():
    account, binding, daemonset = one("ServiceAccount"), one("ClusterRoleBinding"), one("DaemonSet")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": one("ClusterRole")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert daemonset["metadata"]["namespace"] == account["metadata"]["namespace"]


def test_the_daemonset_runs_the_kube_source_on_the_host_network_with_net_admin_only():
    daemonset = one("DaemonSet")
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= daemonset["spec"]["template"]["metadata"][
        "labels"].items()
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    (container,) = spec["containers"]
    security = container["securityContext"]
    assert security.get("privileged") is not True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert security["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 10256}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": 10256}  # not restarted when draining
    command = container["command"]
    assert command[:2] == ["dataplane", "run"]
    args = _parser().parse_args(command[1:])  # the flags exist and parse
    assert args.config == "/var/lib/dataplane/config.conf" and args.hostname_override == "$(NODE_NAME)"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_the_containerfile_installs_the_project_and_the_nftables_library():
    text = (ROOT / "deploy" / "Containerfile").read_text()
    assert "pip install" in text and "libnftables1" in text
    assert '"dataplane", "run"' in text
    for copied in ("pyproject.toml", "dataplane"):
        assert (ROOT / copied).exists()


def test_the_systemd_units_command_line_parses():
    exec_start = next(line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
                      if line.startswith("ExecStart="))
    binary, *argv = exec_start.split()
    assert binary == "/opt/dataplane/venv/bin/dataplane"
    args = _parser().parse_args(argv)
    assert args.command == "run" and args.source == "/etc/dataplane/manifests"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    # The unit names /opt/dataplane's binary; point a copy at this checkout's so that
    # the check does not depend on an installation (test_provision verifies the installed one).
    dataplane = shutil.which("dataplane") or str(Path(ROOT / ".venv" / "bin" / "dataplane"))
    unit = tmp_path / "dataplane.service"
    unit.write_text(UNIT.read_text().replace("/opt/dataplane/venv/bin/dataplane", dataplane))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "dataplane.service" not in done.stderr, done.stderr  # no warning about our unit


# ---- issue 12: the ConfigMap, the mounts, and a schema validation of every manifest


def _mounts(container: dict) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def test_the_daemonset_mounts_its_config_map_and_the_xtables_lock():
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = _mounts(container)
    assert volumes["config"]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert mounts["config"] == "/var/lib/dataplane"
    assert volumes["xtables-lock"]["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert mounts["xtables-lock"] == "/run/xtables.lock"


def test_the_config_maps_config_reads_as_the_daemonset_runs_it(tmp_path):
    from dataplane import cli

    data = one("ConfigMap")["data"]
    for key, text in data.items():
        (tmp_path / key).write_text(text)
    command = one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["command"]
    argv = [a.replace("/var/lib/dataplane", str(tmp_path)) for a in command[1:]]
    parser = _parser()
    args = parser.parse_args(argv)
    cli.apply_config(args, argv[1:], parser, __import__("logging").getLogger("test"))
    assert args.source == "kube" and args.proxy_mode == "kernel"
    assert args.kubeconfig == "/var/lib/dataplane/kubeconfig.conf"  # where the DaemonSet mounts it
    assert cli.bind_addresses(args) == ("0.0.0.0:10256", "127.0.0.1:10249")
    kubeconfig = yaml.safe_load(data["kubeconfig.conf"])
    (cluster,) = kubeconfig["clusters"]
    assert cluster["cluster"]["server"].startswith("https://")
    assert "kubernetes.default" not in cluster["cluster"]["server"], "not through the Service we program"
    assert cluster["cluster"]["certificate-authority"].startswith("/var/run/secrets/kubernetes.io/serviceaccount/")
    assert kubeconfig["users"][0]["user"]["tokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token"


kubernetes_validate = pytest.importorskip("kubernetes_validate")


@pytest.mark.parametrize("document", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_validates_against_the_kubernetes_schema(document):
    kubernetes_validate.validate(document, "1.31", strict=True)  # raises ValidationError naming the field


def test_the_validator_catches_a_wrong_field():
    daemonset = one("DaemonSet")
    daemonset["spec"]["template"]["spec"]["nodeSelectr"] = {"kubernetes.io/os": "linux"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, "1.31", strict=True)
