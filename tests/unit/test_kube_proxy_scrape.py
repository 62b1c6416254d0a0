"""deploy/grafana/prometheus-scrape.yaml finds the DaemonSet's Pods and scrapes kube-proxy's metrics port.

Prometheus' relabelling is replayed here over the Pod the DaemonSet makes: the
`keep` rule must match its labels, the target must be its IP on the port the
daemon serves /metrics on, and the dashboard's job variable must list the job.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from dataplane.daemon import kubeproxy_config as kpc
from tests.kubeproxy import scrape

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def daemonset() -> dict:
    return yaml.safe_load((DEPLOY / "kubernetes" / "daemonset.yaml").read_text())


def relabel(rules: list[dict], meta: dict[str, str]) -> dict[str, str] | None:
    """Prometheus' relabel_configs (keep and replace, the actions the job uses) over one target."""
    labels = dict(meta)
    for rule in rules:
        value = ";".join(labels.get(name, "") for name in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                labels[rule["target_label"]] = match.expand(rule.get("replacement", "$1").replace("$", "\\"))
        else:
            raise AssertionError(f"relabel action {action} is not replayed here")
    return labels


def test_the_scrape_job_keeps_the_daemonsets_pods_on_the_metrics_port():
    (job,) = yaml.safe_load((DEPLOY / "grafana" / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    ds = daemonset()
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [ds["metadata"]["namespace"]]
    pod = {f"__meta_kubernetes_pod_label_{k.replace('.', '_').replace('/', '_').replace('-', '_')}": v
           for k, v in ds["spec"]["template"]["metadata"]["labels"].items()}
    pod |= {"__meta_kubernetes_pod_ip": "192.168.60.1", "__meta_kubernetes_pod_node_name": "node-a",
            "__address__": "192.168.60.1"}
    target = relabel(job["relabel_configs"], pod)
    assert target is not None, "the keep rule drops the DaemonSet's Pods"
    assert target["__address__"] == f"192.168.60.1:{kpc.METRICS_PORT}" and target["node"] == "node-a"
    other = relabel(job["relabel_configs"], {**pod, "__meta_kubernetes_pod_label_app_kubernetes_io_name": "x"})
    assert other is None, "the job scrapes other Pods too"


def test_the_dashboards_job_variable_lists_the_scrape_job():
    (job,) = yaml.safe_load((DEPLOY / "grafana" / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    variables = {v["name"]: v for v in scrape.load_dashboard()["templating"]["list"]}
    assert "label_values(" in variables["job"]["query"]["query"] and variables["job"]["includeAll"]
    assert job["job_name"] == "kube-proxy"  # kube-proxy's own dashboards select job="kube-proxy"
