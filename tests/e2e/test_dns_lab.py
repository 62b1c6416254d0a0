"""Cluster DNS end to end: `dataplane run --dns-bind-address` in a node namespace,
queried by dig, glibc and dnspython from Pod and client namespaces, and curl
reaching nginx by name through the data plane.

Address plan (dataplane.lab.topology): node 10.244.1.1 towards the Pods (where
DNS listens, port 53) and 192.168.50.1 towards the client 192.168.50.2; Pods
pod1-3 at 10.244.1.11-13, serving HTTP on port 80; ClusterIPs 10.96.0.0/12
(nginx 10.96.0.10:8080). A second DNS server (`python -m dataplane.dns`, zone
`example.test`) on the node's 127.0.0.1:5300 is the upstream.

Each namespace that queries gets /etc/netns/NAME/resolv.conf (what `ip netns
exec` mounts over /etc/resolv.conf), removed in `finally`; the root
namespace's own /etc/resolv.conf is never touched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane.lab.netns import environment_problem
from dataplane.lab.topology import AddressPlan, Lab
from dataplane.lab.wait import wait_until

pytestmark = pytest.mark.netns

NETNS_ETC = Path("/etc/netns")
DNS_IP = "10.244.1.1"
UPSTREAM = "127.0.0.1:5300"
SEARCH = "default.svc.cluster.local svc.cluster.local cluster.local"


@pytest.fixture(scope="module", autouse=True)
def _needs_lab():
    problem = environment_problem()
    missing = [tool for tool in ("dig", "curl") if shutil.which(tool) is None]
    if problem or missing:
        pytest.skip(problem or f"needs {', '.join(missing)} (apt-get install dnsutils curl)")


@contextlib.contextmanager
def netns_resolv_conf(names: list[str], text: str):
    """Writes /etc/netns/NAME/resolv.conf for each namespace; removes them (and the
    directories it made) afterwards, whatever happens. Refuses to overwrite one."""
    made: list[Path] = []
    files: list[Path] = []
    try:
        for name in names:
            directory = NETNS_ETC / name
            for path in (NETNS_ETC, directory):
                try:
                    path.mkdir()
                    made.append(path)
                except FileExistsError:  # another lab may share /etc/netns
                    pass
            target = directory / "resolv.conf"
            if target.exists():
                raise FileExistsError(f"{target} exists; not ours to replace")
            target.write_text(text)
            files.append(target)
        yield
    finally:
        for path in files:
            path.unlink(missing_ok=True)
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()


def pod_manifest(name: str, ip: str, ready: bool = True) -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: nginx}}}}
spec:
  nodeName: node1
  hostname: {name}
  subdomain: nginx-headless
  containers: [{{name: nginx, ports: [{{name: http, containerPort: 80}}]}}]
status:
  podIP: {ip}
  conditions: [{{type: Ready, status: "{str(ready)}"}}]
"""


SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: nginx, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: nginx}
  ports: [{name: http, port: 8080, targetPort: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: nginx-headless, namespace: default}
spec:
  clusterIP: None
  selector: {app: nginx}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: default}
spec: {type: ExternalName, externalName: web.default.svc.example.test}
"""
UPSTREAM_SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.100.5.5, ports: [{port: 80}]}
"""
LATE = """
apiVersion: v1
kind: Service
metadata: {name: late, namespace: default}
spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}
"""


class Cluster:
    """The lab, the two DNS servers and the manifests they read."""

    def __init__(self, lab: Lab, manifests: Path, log: Path):
        self.lab = lab
        self.manifests = manifests
        self.log = log
        self.pod1 = lab.pods[0].ns
        self.client = lab.client

    def dig(self, *args: str, ns=None, check: bool = True) -> list[str] | None:
        """`dig +short` lines, sorted; a failed dig fails the test (or gives None without `check`)."""
        done = (ns or self.pod1).run("dig", "+short", "+time=2", "+tries=2", *args, check=False)
        if done.returncode != 0:
            assert not check, f"dig {' '.join(args)}: {done.stdout} {done.stderr}"
            return None
        return sorted(line for line in done.stdout.splitlines() if line and not line.startswith(";"))

    def status(self, *args: str) -> str:
        done = self.pod1.run("dig", "+time=2", "+tries=2", *args, check=False)
        for line in done.stdout.splitlines():
            if "status:" in line:
                return line.split("status:")[1].split(",")[0].strip()
        raise AssertionError(f"no status from dig {' '.join(args)}: {done.stdout} {done.stderr}")

    def python(self, script: str, ns=None) -> dict:
        done = (ns or self.pod1).run(sys.executable, "-c", script, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def daemon_log(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("dns-lab")
    manifests, upstream_manifests = root / "manifests", root / "upstream"
    manifests.mkdir()
    upstream_manifests.mkdir()
    (manifests / "services.yaml").write_text(SERVICES)
    for i in range(1, 4):
        (manifests / f"pod{i}.yaml").write_text(pod_manifest(f"pod{i}", f"10.244.1.1{i}"))
    (upstream_manifests / "web.yaml").write_text(UPSTREAM_SERVICES)
    log = root / "daemon.log"
    with Lab.build(AddressPlan(pods=3)) as lab:
        names = [ns.name for ns in lab.namespaces]
        with netns_resolv_conf(names, f"nameserver {DNS_IP}\nsearch {SEARCH}\noptions ndots:5 timeout:2\n"):
            lab.start_echo(http=(80,))
            upstream = lab.node.python("-m", "dataplane.dns", "--source", str(upstream_manifests), "--bind", UPSTREAM,
                                       "--cluster-domain", "example.test", "--upstream", "none",
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            assert upstream.stdout.readline().strip() == "ready"
            with log.open("w") as out:
                lab.node.python(
                    "-m", "dataplane", "run", "--source", str(manifests), "--hostname-override", "node1",
                    "--cluster-cidr", "10.244.0.0/16", "--healthz-bind-address", "127.0.0.1:10256",
                    "--metrics-bind-address", "127.0.0.1:10249", "--min-sync-period", "0.1",
                    "--dns-bind-address", f"{DNS_IP}:53", "--dns-upstream", UPSTREAM,
                    stdout=out, stderr=subprocess.STDOUT,
                )
            result = Cluster(lab, manifests, log)
            try:
                wait_until(lambda: result.dig("nginx.default.svc.cluster.local", check=False) == ["10.96.0.10"], 20,
                           interval=0.2, what="the daemon's DNS answering")
            except TimeoutError as error:
                raise AssertionError(f"{error}\n{result.daemon_log()}") from None
            yield result


DIG_CASES = [
    ("ClusterIP A", ["nginx.default.svc.cluster.local"], ["10.96.0.10"]),
    ("search list", ["+search", "nginx"], ["10.96.0.10"]),
    ("search list, namespace given", ["+search", "nginx.default"], ["10.96.0.10"]),
    ("over TCP", ["+tcp", "nginx.default.svc.cluster.local"], ["10.96.0.10"]),
    ("headless A: every ready Pod", ["nginx-headless.default.svc.cluster.local"],
     ["10.244.1.11", "10.244.1.12", "10.244.1.13"]),
    ("Pod hostname/subdomain", ["pod2.nginx-headless.default.svc.cluster.local"], ["10.244.1.12"]),
    ("ClusterIP SRV", ["_http._tcp.nginx.default.svc.cluster.local", "SRV"],
     ["0 100 8080 nginx.default.svc.cluster.local."]),
    ("headless SRV", ["_http._tcp.nginx-headless.default.svc.cluster.local", "SRV"],
     [f"0 33 80 pod{i}.nginx-headless.default.svc.cluster.local." for i in range(1, 4)]),
    ("ClusterIP PTR", ["-x", "10.96.0.10"], ["nginx.default.svc.cluster.local."]),
    ("endpoint PTR", ["-x", "10.244.1.13"], ["pod3.nginx-headless.default.svc.cluster.local."]),
    ("schema version", ["dns-version.cluster.local", "TXT"], ['"1.1.0"']),
    ("no AAAA for an IPv4 Service", ["nginx.default.svc.cluster.local", "AAAA"], []),
    ("forwarded upstream", ["web.default.svc.example.test"], ["10.100.5.5"]),
    ("ExternalName, chased upstream", ["far.default.svc.cluster.local"],
     ["10.100.5.5", "web.default.svc.example.test."]),
]


@pytest.mark.parametrize("case, args, expected", DIG_CASES, ids=[c[0] for c in DIG_CASES])
def test_dig(cluster, case, args, expected):
    assert cluster.dig(*args) == sorted(expected)


@pytest.mark.parametrize("qname, status", [
    ("missing.default.svc.cluster.local", "NXDOMAIN"),
    ("nginx.default.svc.cluster.local AAAA", "NOERROR"),
    ("missing.default.svc.example.test", "NXDOMAIN"),  # the upstream's verdict, relayed
])
def test_negative_answers(cluster, qname, status):
    assert cluster.status(*qname.split()) == status


def test_dig_from_the_client_namespace(cluster):
    assert cluster.dig("nginx.default.svc.cluster.local", ns=cluster.client) == ["10.96.0.10"]


def test_python_resolvers(cluster):
    found = cluster.python("""
import json, socket
import dns.resolver
glibc = sorted({info[4][0] for info in socket.getaddrinfo("nginx", 8080, type=socket.SOCK_STREAM)})
headless = sorted(r.address for r in dns.resolver.resolve("nginx-headless.default.svc.cluster.local", "A"))
srv = sorted(r.to_text() for r in dns.resolver.resolve("_http._tcp.nginx.default.svc.cluster.local", "SRV"))
try:
    dns.resolver.resolve("missing.default.svc.cluster.local", "A")
    missing = "resolved"
except dns.resolver.NXDOMAIN:
    missing = "NXDOMAIN"
print(json.dumps({"glibc": glibc, "headless": headless, "srv": srv, "missing": missing}))
""")
    assert found == {
        "glibc": ["10.96.0.10"],
        "headless": ["10.244.1.11", "10.244.1.12", "10.244.1.13"],
        "srv": ["0 100 8080 nginx.default.svc.cluster.local."],
        "missing": "NXDOMAIN",
    }


@pytest.mark.parametrize("where", ["pod1", "client"])
def test_curl_reaches_nginx_by_name(cluster, where):
    ns = cluster.pod1 if where == "pod1" else cluster.client
    answered = set()
    for _ in range(12):
        done = ns.run("curl", "-sS", "--max-time", "3", "http://nginx.default.svc.cluster.local:8080/", check=False)
        assert done.returncode == 0, done.stderr
        answered.add(done.stdout.split()[0])
    assert answered and answered <= {"pod1", "pod2", "pod3"}
    assert len(answered) >= 2, f"load-balanced across Pods, got {answered}"


def test_changes_are_visible_within_a_sync(cluster):
    late = cluster.manifests / "late.yaml"
    pod3 = cluster.manifests / "pod3.yaml"
    try:
        began = time.monotonic()
        late.write_text(LATE)
        wait_until(lambda: cluster.dig("late.default.svc.cluster.local") == ["10.96.0.50"], 5, interval=0.1,
                   what="a new Service resolving")
        created = time.monotonic() - began
        began = time.monotonic()
        pod3.write_text(pod_manifest("pod3", "10.244.1.13", ready=False))
        wait_until(lambda: cluster.dig("nginx-headless.default.svc.cluster.local") == ["10.244.1.11", "10.244.1.12"],
                   5, interval=0.1, what="a not-ready Pod leaving the headless answer")
        gone = time.monotonic() - began
        assert cluster.dig("pod3.nginx-headless.default.svc.cluster.local") == []
        late.unlink()
        wait_until(lambda: cluster.status("late.default.svc.cluster.local") == "NXDOMAIN", 5, interval=0.1,
                   what="a deleted Service disappearing")
        print(f"new Service resolvable after {created:.2f} s, Pod gone after {gone:.2f} s")
    finally:
        late.unlink(missing_ok=True)
        pod3.write_text(pod_manifest("pod3", "10.244.1.13"))


def test_resolv_conf_helper_cleans_up(tmp_path):
    name = f"dns-test-{time.monotonic_ns()}"
    directory = NETNS_ETC / name
    with pytest.raises(RuntimeError):
        with netns_resolv_conf([name], "nameserver 192.0.2.1\n"):
            assert (directory / "resolv.conf").read_text() == "nameserver 192.0.2.1\n"
            raise RuntimeError("boom")
    assert not directory.exists()
