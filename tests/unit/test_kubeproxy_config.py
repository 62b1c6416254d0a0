"""kube-proxy's config file and flags: decoding, precedence, and what each honoured field changes.

Files: tests/kubeproxy/kubeadm-config.conf is config.conf as kubeadm writes it into
the kube-proxy ConfigMap; tests/kubeproxy/every-field.yaml sets every field of
v1alpha1 KubeProxyConfiguration (and our extension document).

Address plan: Pods 10.244.0.0/16 and fd00:244::/32, nodes 192.168.60.0/24.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dataplane import cli
from dataplane.config import NodeSettings
from dataplane.daemon import kubeproxy_config as kpc
from dataplane.daemon import nodetuning

ROOT = Path(__file__).resolve().parents[2]
KUBEADM = ROOT / "tests" / "kubeproxy" / "kubeadm-config.conf"
EVERY = ROOT / "tests" / "kubeproxy" / "every-field.yaml"


def resolved(*argv: str):
    """`dataplane run ARGV` parsed, with --config applied as main() applies it."""
    parser = cli._parser()
    args = parser.parse_args(["run", *argv])
    cli.apply_config(args, list(argv), parser, logging.getLogger("test"))
    return args


def defaults():
    return resolved()


# ---- values in kube-proxy's spelling

@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("1m30s", 90), ("24h0m0s", 86400), ("250ms", 0.25), ("0", 0), ("0s", 0), ("1.5h", 5400),
    ("15m", 900), ("2h45m", 9900), ("100us", 0.0001), ("1h1m1s", 3661),
])
def test_go_durations(text, seconds):
    assert kpc.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["30", "s", "1x", "1m 30s", "", "-5s", "5s3"])
def test_not_go_durations(text):
    with pytest.raises(ValueError):
        kpc.parse_duration(text)


def test_bare_seconds_only_where_asked():
    assert kpc.parse_duration("1.5", bare_seconds=True) == 1.5
    with pytest.raises(ValueError):
        kpc.parse_duration("1.5")


@pytest.mark.parametrize("text, default, want", [
    ("0.0.0.0:10256", 10256, "0.0.0.0:10256"), ("127.0.0.1", 10249, "127.0.0.1:10249"),
    ("::", 10256, "[::]:10256"), ("[::1]:9000", 10249, "[::1]:9000"), ("", 10256, ""), ("  ", 10256, ""),
    ("fd00::1", 10256, "[fd00::1]:10256"),
])
def test_bind_addresses(text, default, want):
    assert kpc.bind_address(text, default, "x") == want


@pytest.mark.parametrize("text", ["localhost:10256", "1.2.3.4:x", "1.2.3.4:70000", "[::1]x"])
def test_bad_bind_addresses_name_the_flag(text):
    with pytest.raises(kpc.ConfigError, match="healthz-bind-address"):
        kpc.bind_address(text, 1, "healthz-bind-address")


# ---- the flags

def test_kube_proxy_flag_spellings_parse():
    args = resolved("--sync-period=30s", "--min-sync-period=1s", "--config-sync-period=10m",
                    "--conntrack-tcp-timeout-established=24h", "--conntrack-tcp-timeout-close-wait=1h",
                    "--conntrack-udp-timeout=30s", "--conntrack-udp-timeout-stream=2m", "--conntrack-max-per-core=0",
                    "--conntrack-min=1000", "--conntrack-tcp-be-liberal", "--v=4", "--logging-format=json",
                    "--healthz-bind-address=127.0.0.1", "--metrics-bind-address=", "--bind-address=192.168.60.1",
                    "--bind-address-hard-fail", "--detect-local-mode=ClusterCIDR", "--masquerade-bit=12",
                    "--oom-score-adj=-500", "--feature-gates=A=true,B=false", "--kube-api-qps=20",
                    "--kube-api-burst=40", "--proxy-mode=nftables")
    assert (args.sync_period, args.min_sync_period, args.config_sync_period) == (30, 1, 600)
    assert (args.conntrack_tcp_timeout_established, args.conntrack_tcp_timeout_close_wait) == (86400, 3600)
    assert (args.conntrack_udp_timeout, args.conntrack_udp_timeout_stream) == (30, 120)
    assert (args.conntrack_max_per_core, args.conntrack_min, args.conntrack_tcp_be_liberal) == (0, 1000, True)
    assert (args.v, args.logging_format, args.masquerade_bit, args.oom_score_adj) == (4, "json", 12, -500)
    assert args.feature_gates == {"A": True, "B": False}
    assert (args.kube_api_qps, args.kube_api_burst, args.proxy_mode) == (20, 40, "kernel")
    assert cli.bind_addresses(args) == ("127.0.0.1:10256", "")
    assert cli._primary_ip(args.bind_address) == "192.168.60.1" and cli._primary_ip("0.0.0.0") == ""
    assert cli.settings_from(args).masquerade_bit == 1 << 12


@pytest.mark.parametrize("flag, dest, want", [
    ("--masquerade-all", "masquerade_all", True),
    ("--masquerade-all=true", "masquerade_all", True),
    ("--masquerade-all=false", "masquerade_all", False),
    ("--bind-address-hard-fail=1", "bind_address_hard_fail", True),
    ("--conntrack-tcp-be-liberal=F", "conntrack_tcp_be_liberal", False),
    ("--init-only=true", "init_only", True),
])
def test_bool_flags_take_pflags_syntax(flag, dest, want):
    assert getattr(resolved(flag), dest) is want


# kube-proxy flags that mean nothing here: accepted in its syntax, so its DaemonSet's arguments start us.
@pytest.mark.parametrize("flag, logged", [
    ("--iptables-localhost-nodeports=false", "--iptables-localhost-nodeports is ignored: NodePorts never answer"),
    ("--ipvs-scheduler=rr", "--ipvs-scheduler is ignored: an IPVS setting"),
    ("--ipvs-sync-period=30s", "--ipvs-sync-period is ignored"),
    ("--ipvs-strict-arp", "--ipvs-strict-arp is ignored"),
    ("--profiling=false", "--profiling is ignored: no /debug/pprof"),
    ("--vmodule=proxier=5", "--vmodule is ignored"),
    ("--log-flush-frequency=5s", "--log-flush-frequency is ignored"),
    ("--log-text-split-stream", "--log-text-split-stream is ignored"),
    ("--show-hidden-metrics-for-version=1.33", "--show-hidden-metrics-for-version is ignored"),
])
def test_kube_proxy_flags_without_a_meaning_here_are_accepted_and_logged(flag, logged, caplog):
    with caplog.at_level(logging.INFO):
        cli.log_ignored_flags(resolved(flag), logging.getLogger("test"))
    messages = [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]
    assert len(messages) == 1 and logged in messages[0]


@pytest.mark.parametrize("argv, message", [
    (["--ipvs-sync-period=30x"], "not a duration"),
    (["--profiling=maybe"], "not true or false"),
    (["--masquerade-all=yes"], "not true or false"),
])
def test_bad_values_of_kube_proxy_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["run", *argv])
    assert message in capsys.readouterr().err


def test_old_spellings_still_work():
    args = resolved("--sync-period", "300", "--min-sync-period", "0.5", "--iptables-sync-period=1m")
    assert (args.sync_period, args.min_sync_period) == (60, 0.5)  # the last of the two spellings wins
    assert resolved("--min-sync-period", "2").min_sync_period == 2


def test_kube_proxy_defaults():
    args = defaults()
    assert cli.bind_addresses(args) == ("0.0.0.0:10256", "127.0.0.1:10249")
    assert (args.masquerade_bit, args.oom_score_adj, args.conntrack_max_per_core, args.conntrack_min) == (
        14, -999, 32768, 131072)
    assert (args.conntrack_tcp_timeout_established, args.conntrack_tcp_timeout_close_wait) == (86400, 3600)
    assert args.min_sync_period == 1 and args.sync_period == 300  # ours: a full resync (README)


def test_deprecated_port_flags():
    assert cli.bind_addresses(resolved("--healthz-port=0", "--metrics-port=9999")) == ("", "127.0.0.1:9999")


@pytest.mark.parametrize("argv, message", [
    (["--proxy-mode=ipvs"], "IPVS is not implemented"),
    (["--proxy-mode=kernelspace"], "Windows"),
    (["--sync-period=30x"], "not a duration"),
    (["--feature-gates=A=yes"], "NAME=true|false"),
])
def test_bad_flags_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["run", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--detect-local-mode=BridgeInterface"], "only ClusterCIDR"),
    (["--masquerade-bit=32"], "[0, 31]"),
    (["--oom-score-adj=-1001"], "[-1000, 1000]"),
    (["--nodeport-addresses=localhost"], "loopback"),
    (["--healthz-bind-address=nowhere"], "healthz-bind-address"),
    (["--kube-api-burst=-1"], "kube-api-burst: must not be negative"),
    (["--config-sync-period=0s"], "config-sync-period: must be greater than 0"),
    (["--kube-api-content-type=json"], "not a media type"),
])
def test_values_without_an_implementation_are_usage_errors(argv, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cli.settings_from(resolved(*argv))


def test_nodeport_keywords():
    assert cli._nodeport_addresses("primary") == ((), True)
    assert cli._nodeport_addresses("all") == ((), False)
    assert cli._nodeport_addresses("10.0.0.0/8, primary") == (("10.0.0.0/8",), True)


# ---- the config file

def test_kubeadms_config_conf_resolves_to_kube_proxys_defaults():
    loaded = kpc.load(KUBEADM)
    assert loaded.mode == "" and loaded.ignored == []  # every ignored field is at its zero value
    args = resolved("--config", str(KUBEADM), "--hostname-override=node1")
    assert args.source == "kube" and args.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert args.cluster_cidr == "10.244.0.0/16" and args.hostname_override == "node1"
    assert cli.bind_addresses(args) == ("0.0.0.0:10256", "127.0.0.1:10249")  # "" in the file: the default
    assert (args.masquerade_bit, args.oom_score_adj, args.min_sync_period) == (14, -999, 1.0)
    assert (args.conntrack_max_per_core, args.conntrack_min, args.conntrack_tcp_timeout_established) == (
        32768, 131072, 86400)
    assert cli.settings_from(args) == NodeSettings(node_name="node1", cluster_cidrs=("10.244.0.0/16",))


def test_every_field_set():
    args = resolved("--config", str(EVERY))
    settings = cli.settings_from(args)
    # kube-proxy's fields
    assert args.kubeconfig == "/etc/dataplane/kubeconfig.conf"
    assert (args.kube_api_qps, args.kube_api_burst, args.kube_api_content_type) == (7.5, 20, "application/json")
    assert (args.logging_format, args.v) == ("json", 4)
    assert settings.node_name == "node-7"  # lower-cased, as kube-proxy does
    assert cli._primary_ip(args.bind_address) == "192.168.60.1"
    assert cli.bind_addresses(args) == ("192.168.60.1:10256", "192.168.60.1:19249")
    assert args.bind_address_hard_fail is True
    # mode nftables: the nftables section, not the iptables one
    assert (settings.masquerade_all, settings.masquerade_bit) == (True, 1 << 12)
    assert (args.sync_period, args.min_sync_period) == (3600, 0.25)
    assert settings.cluster_cidrs == ("10.244.0.0/16", "fd00:244::/32")
    assert settings.nodeport_cidrs == ("192.168.60.0/24", "fd00:60::/64")
    assert args.oom_score_adj == -500
    assert nodetuning.plan(_conntrack(args), cpus=2) == [
        nodetuning.Write("net/netfilter/nf_conntrack_max", 4096),  # max(1024 x 2, min 4096)
        nodetuning.Write(nodetuning.HASHSIZE, 1024, only_raise=True),
        nodetuning.Write("net/netfilter/nf_conntrack_tcp_timeout_established", 7200),
        nodetuning.Write("net/netfilter/nf_conntrack_tcp_timeout_close_wait", 1800),
        nodetuning.Write("net/netfilter/nf_conntrack_udp_timeout", 45),
        nodetuning.Write("net/netfilter/nf_conntrack_udp_timeout_stream", 180),
        nodetuning.Write("net/netfilter/nf_conntrack_tcp_be_liberal", 1),
    ]
    assert args.feature_gates == {"KubeProxyNFTablesLocalhostNodePorts": False, "TopologyAwareHints": True}
    assert args.config_sync_period == 600
    # our extension document
    assert (args.source, args.proxy_mode, args.queues, args.lb_algorithm) == (
        "/etc/dataplane/manifests", "userspace", 2, "maglev")
    assert (settings.node_zone, settings.service_cidrs) == ("zone-b", ("10.96.0.0/12",))
    assert (args.dns_bind_address, args.cluster_domain, args.dns_ttl) == ("192.168.60.1:53", "cluster.example", 30)
    assert args.dns_upstream == "192.168.60.53,192.168.60.54:5353"
    ignored = dict(kpc.load(EVERY).ignored)
    for name in ("winkernel.networkName", "ipvs.scheduler", "enableProfiling", "iptables", "portRange",
                 "windowsRunAsService", "showHiddenMetricsForVersion", "iptables.localhostNodePorts"):
        assert name in ignored, name


def _conntrack(args) -> nodetuning.Conntrack:
    return nodetuning.Conntrack(args.conntrack_max_per_core, args.conntrack_min,
                                args.conntrack_tcp_timeout_established, args.conntrack_tcp_timeout_close_wait,
                                args.conntrack_tcp_be_liberal, args.conntrack_udp_timeout,
                                args.conntrack_udp_timeout_stream)


@pytest.mark.parametrize("mode", ["iptables", ""])
def test_iptables_mode_reads_the_iptables_section(tmp_path, mode):
    text = (EVERY.read_text().replace("mode: nftables", f'mode: "{mode}"')
            .replace("  masqueradeAll: false\n", "  masqueradeAll: MINE\n")  # iptables' false, nftables' true:
            .replace("  masqueradeAll: true\n", "  masqueradeAll: false\n").replace("MINE", "true"))  # swapped
    (tmp_path / "c.yaml").write_text(text)
    args = resolved("--config", str(tmp_path / "c.yaml"))
    settings = cli.settings_from(args)
    assert (settings.masquerade_all, settings.masquerade_bit, args.sync_period, args.min_sync_period) == (
        True, 1 << 3, 120, 9)


@pytest.mark.parametrize("text, message", [
    ("detectLocalMode: NodeCIDR", "detect-local-mode 'NodeCIDR': only ClusterCIDR"),
    ("detectLocalMode: BridgeInterface\ndetectLocal: {bridgeInterface: cbr0}", "'BridgeInterface': only ClusterCIDR"),
    ("nodePortAddresses: [localhost]", "NodePorts never answer on loopback"),
    ("oomScoreAdj: 1001", "oom-score-adj 1001"),
    ("nftables: {masqueradeBit: 40}\nmode: nftables", "masquerade-bit 40"),
])
def test_file_values_without_an_implementation_exit_2(tmp_path, caplog, text, message):
    path = tmp_path / "config.conf"
    path.write_text(f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\n{text}\n")
    assert cli.main(["run", "--config", str(path)]) == cli.EXIT_USAGE
    assert message in caplog.text


@pytest.mark.parametrize("fields, want", [
    ("bindAddress: fd00:60::1", ("[::]:10256", "[::1]:10249")),
    ("bindAddress: '::'\nhealthzBindAddress: ''\nmetricsBindAddress: '[::]:9'", ("[::]:10256", "[::]:9")),
    ("bindAddress: 192.168.60.1", ("0.0.0.0:10256", "127.0.0.1:10249")),
    ("bindAddress: '::ffff:192.168.60.1'", ("0.0.0.0:10256", "127.0.0.1:10249")),  # Go's To4() takes it as IPv4
])
def test_an_ipv6_bind_address_makes_the_servers_defaults_ipv6(tmp_path, fields, want):
    """kube-proxy's v1alpha1 defaulting of healthzBindAddress and metricsBindAddress."""
    path = tmp_path / "c.yaml"
    path.write_text(f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\n{fields}\n")
    assert cli.bind_addresses(resolved("--config", str(path))) == want


def test_json_is_read_too(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"apiVersion": kpc.API_VERSION, "kind": kpc.KIND,
                                                 "clusterCIDR": "10.244.0.0/16", "mode": "nftables"}))
    assert resolved("--config", str(tmp_path / "c.json")).cluster_cidr == "10.244.0.0/16"


# kube-proxy's precedence (cmd/kube-proxy/app/options.go): the file replaces flags, except -v,
# --logging-format and --hostname-override; our own flags beat our extension document.
@pytest.mark.parametrize("flag, dest, from_flag, want", [
    ("--cluster-cidr=10.99.0.0/16", "cluster_cidr", False, "10.244.0.0/16,fd00:244::/32"),
    ("--sync-period=5s", "sync_period", False, 3600),
    ("--masquerade-bit=1", "masquerade_bit", False, 12),
    ("--healthz-bind-address=127.0.0.2:1", "healthz_bind_address", False, "192.168.60.1"),
    ("--hostname-override=flag-node", "hostname_override", True, "flag-node"),
    ("--v=1", "v", True, 1),
    ("--logging-format=text", "logging_format", True, "text"),
    ("--queues=5", "queues", True, 5),
    ("--lb-algorithm=random", "lb_algorithm", True, "random"),
])
def test_precedence_between_flags_and_config(flag, dest, from_flag, want):
    args = resolved("--config", str(EVERY), flag)
    assert getattr(args, dest) == want


def test_an_empty_hostname_override_flag_leaves_the_files(tmp_path):
    """kube-proxy's processHostnameOverrideFlag: only a non-empty flag replaces hostnameOverride,
    and one of blanks only is refused ("empty hostname-override is invalid"), with --config or not."""
    assert resolved("--config", str(EVERY), "--hostname-override=").hostname_override == "Node-7"
    for argv in (("--config", str(EVERY), "--hostname-override", "  "), ("--hostname-override", "  ")):
        with pytest.raises(ValueError, match="hostname-override"):
            cli.settings_from(resolved(*argv))


def test_a_flag_left_out_of_the_file_takes_kube_proxys_default_not_the_flags(tmp_path):
    (tmp_path / "c.yaml").write_text(f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\n")
    args = resolved("--config", str(tmp_path / "c.yaml"), "--masquerade-all", "--conntrack-min=5")
    assert args.masquerade_all is False and args.conntrack_min == 131072


def test_given_flags_sees_spellings_and_abbreviations():
    parser = cli._parser()
    given = cli.given_flags(parser, ["--config", "x", "--sync-period=1s", "--masquerade-a", "-v", "--v=3"])
    assert {"config", "sync_period", "verbose", "v", "masquerade_all"} <= given
    assert "config_sync_period" not in given and "masquerade_bit" not in given


# A wrong type fails both of kube-proxy's decoders: exit 2, naming the field.
@pytest.mark.parametrize("text, message", [
    ("conntrack: {maxPerCore: many}", "conntrack.maxPerCore: want an integer, got a string \"many\""),
    ("iptables: {syncPeriod: 30}", "iptables.syncPeriod: want a duration string like \"30s\", got an integer 30"),
    ("iptables: {syncPeriod: 30q}", "iptables.syncPeriod: want a duration"),
    ("nodePortAddresses: 10.0.0.0/8", "nodePortAddresses: want a list of strings"),
    ("bindAddressHardFail: yes please", "bindAddressHardFail: want true or false"),
    ("featureGates: {A: 1}", "featureGates: want a map of names to true/false"),
    ("mode: ipvs", "IPVS is not implemented here"),
    ("mode: kernelspace", "Windows"),
    ("mode: userspace", "not a kube-proxy mode"),
    ("clientConnection: {qps: fast}", "clientConnection.qps: want a number"),
    ("ipvs: {scheduler: [rr]}", "ipvs.scheduler: want a string"),
    ("conntrack: 5", "conntrack: want a mapping"),
])
def test_wrong_types_name_the_field(tmp_path, text, message):
    path = tmp_path / "config.conf"
    path.write_text(f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\n{text}\n")
    with pytest.raises(kpc.ConfigError) as error:
        kpc.load(path)
    assert message in str(error.value) and str(path) in str(error.value)


# What kube-proxy's strict decoder refuses and its lenient v1alpha1 decoder then accepts
# (cmd/kube-proxy/app/options.go, loadConfig): the rest of the file is used, each one is a warning.
@pytest.mark.parametrize("text, lenient, field, want", [
    ("clusterCidr: 10.0.0.0/8\nclusterCIDR: 10.244.0.0/16", "clusterCidr: unknown field (did you mean clusterCIDR?)",
     "cluster_cidr", "10.244.0.0/16"),
    ("ipvs: {bogus: 1}\nclusterCIDR: 10.244.0.0/16", "ipvs.bogus: unknown field", "cluster_cidr", "10.244.0.0/16"),
    ("metadata: {name: kube-proxy}", "metadata: unknown field", "cluster_cidr", ""),  # kustomize's, kubernetes#84143
    ("clusterCIDR: 10.1.0.0/16\nclusterCIDR: 10.244.0.0/16", "'clusterCIDR' is given twice (line 4); the last",
     "cluster_cidr", "10.244.0.0/16"),
    ("hostnameOverride: null", None, "hostname_override", ""),  # Go leaves a field read as null unset
    ("conntrack: {min: null}", None, "conntrack_min", 131072),
])
def test_unknown_and_repeated_fields_are_warnings_as_in_kube_proxy(tmp_path, caplog, text, lenient, field, want):
    path = tmp_path / "config.conf"
    path.write_text(f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\n{text}\n")
    loaded = kpc.load(path)
    assert [lenient in problem for problem in loaded.lenient] == ([True] if lenient else [])
    with caplog.at_level(logging.WARNING):
        assert getattr(resolved("--config", str(path)), field) == want
    assert (lenient in caplog.text and "lenient decoding" in caplog.text) if lenient else "lenient" not in caplog.text


def test_a_repeated_key_in_json_is_a_warning_too(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(f'{{"apiVersion": "{kpc.API_VERSION}", "kind": "{kpc.KIND}", '
                    '"clusterCIDR": "10.1.0.0/16", "clusterCIDR": "10.244.0.0/16"}')
    loaded = kpc.load(path)
    assert loaded.values["cluster_cidr"] == "10.244.0.0/16" and "'clusterCIDR' is given twice" in loaded.lenient[0]


@pytest.mark.parametrize("text, message", [
    ("apiVersion: v1\nkind: ConfigMap\n", "want kubeproxy.config.k8s.io/v1alpha1/KubeProxyConfiguration"),
    ("[1, 2]\n", "not a mapping"),
    ("a: [\n", "not YAML or JSON"),
    (f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\n---\nkind: Other\n", "our own settings"),
    (f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\n---\napiVersion: {kpc.EXTENSION_API_VERSION}\n"
     f"kind: {kpc.EXTENSION_KIND}\nqueues: two\n", "queues: want an integer"),
])
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "config.conf"
    path.write_text(text)
    with pytest.raises(kpc.ConfigError, match=message.replace("[", r"\[")):
        kpc.load(path)


def test_a_bad_config_exits_2_naming_the_field(tmp_path, caplog):
    path = tmp_path / "config.conf"
    path.write_text(f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\nconntrack: {{min: lots}}\n")
    assert cli.main(["run", "--config", str(path)]) == cli.EXIT_USAGE
    assert "conntrack.min: want an integer" in caplog.text


def test_kube_proxys_command_line_without_a_subcommand_is_run(tmp_path, caplog):
    """kube-proxy's DaemonSet command (`kube-proxy --config=FILE --hostname-override=...`) with our name."""
    path = tmp_path / "config.conf"
    path.write_text(f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\nconntrack: {{min: lots}}\n")
    assert cli.main([f"--config={path}", "--hostname-override=node1", "--v=2"]) == cli.EXIT_USAGE
    assert "conntrack.min: want an integer" in caplog.text  # run read the file


def test_a_missing_config_exits_2(tmp_path, caplog):
    assert cli.main(["run", "--config", str(tmp_path / "nope")]) == cli.EXIT_USAGE
    assert "No such file" in caplog.text


def test_fields_removed_from_kube_proxy_are_ignored_not_refused(tmp_path):
    path = tmp_path / "old.conf"
    path.write_text(f"apiVersion: {kpc.API_VERSION}\nkind: {kpc.KIND}\nudpIdleTimeout: 250ms\n"
                    "resourceContainer: /kube-proxy\nconntrack: {max: null, maxPerCore: 32768}\n")
    assert [name for name, _ in kpc.load(path).ignored] == ["udpIdleTimeout", "resourceContainer"]


def test_ignored_fields_are_logged_once(caplog):
    with caplog.at_level(logging.INFO):
        resolved("--config", str(EVERY))
    lines = [r.getMessage() for r in caplog.records if "winkernel.networkName is ignored" in r.getMessage()]
    assert len(lines) == 1
    assert any("kernel mode" in r.getMessage() and "'nftables'" in r.getMessage() for r in caplog.records)


def test_json_logs_carry_the_figures_as_keys_and_text_logs_as_key_value():
    record = logging.LogRecord("dataplane", logging.INFO, "", 0, "full sync: %d commands", (91,), None)
    record.commands, record.ms = 91, 12.5
    entry = json.loads(cli.JsonFormatter().format(record))
    assert entry["msg"] == "full sync: 91 commands" and entry["commands"] == 91 and entry["ms"] == 12.5
    assert entry["level"] == "info" and entry["logger"] == "dataplane" and entry["ts"].endswith("Z")
    line = cli.LogfmtFormatter().format(record)
    assert line.endswith('msg="full sync: 91 commands" commands=91 ms=12.5')


def test_logging_format_and_verbosity_flags_configure_the_root_logger():
    cli._configure_logging(resolved("--logging-format=json", "--v=4"))
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_dataplane", False)]
    assert len(ours) == 1 and isinstance(ours[0].formatter, cli.JsonFormatter) and root.level == logging.DEBUG
    cli._configure_logging(resolved())
    ours = [h for h in root.handlers if getattr(h, "_dataplane", False)]
    assert len(ours) == 1 and isinstance(ours[0].formatter, cli.LogfmtFormatter) and root.level == logging.INFO


def test_node_tuning_writes_only_what_differs_and_warns_where_it_cannot(tmp_path, caplog):
    netfilter = tmp_path / "net" / "netfilter"
    netfilter.mkdir(parents=True)
    (netfilter / "nf_conntrack_tcp_timeout_established").write_text("432000\n")
    (netfilter / "nf_conntrack_tcp_timeout_close_wait").write_text("3600\n")
    writes = nodetuning.plan(nodetuning.Conntrack(), cpus=4)  # kube-proxy's defaults
    assert [w.path.rsplit("/", 1)[1] for w in writes] == [
        "nf_conntrack_max", "hashsize", "nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_timeout_close_wait"]
    assert writes[0].value == 131072  # 32768 x 4 = 131072 = the minimum
    hashsize = tmp_path / nodetuning.HASHSIZE.lstrip("/")
    hashsize.parent.mkdir(parents=True)
    hashsize.write_text("65536\n")  # bigger than 131072 / 4 already: kept
    with caplog.at_level(logging.INFO):
        warnings = nodetuning.apply(writes, root=tmp_path, sys_root=tmp_path)
    assert hashsize.read_text() == "65536\n"
    assert (netfilter / "nf_conntrack_tcp_timeout_established").read_text() == "86400\n"
    assert "set sysctl net.netfilter.nf_conntrack_tcp_timeout_established to 86400 (was 432000)" in caplog.text
    assert "close_wait" not in caplog.text  # already right: not written, not logged
    assert len(warnings) == 1 and "nf_conntrack_max" in warnings[0]  # missing entry: a warning, not a failure
    assert nodetuning.plan(nodetuning.Conntrack(max_per_core=0, tcp_established_timeout=0,
                                                tcp_close_wait_timeout=0), cpus=4) == []


def test_oom_score_adj(tmp_path):
    path = tmp_path / "oom_score_adj"
    path.write_text("0\n")
    assert nodetuning.set_oom_score_adj(-999, path) is None and path.read_text() == "-999\n"
    assert "cannot set" in nodetuning.set_oom_score_adj(5, tmp_path / "missing" / "x")


# ---- what reaches the daemon


@pytest.fixture
def recorded(monkeypatch):
    """`cli._run` without a daemon or the host's /proc: (the Options each Daemon got, the tuning writes)."""
    import uvloop

    from dataplane.daemon import app

    started, tuned = [], []
    monkeypatch.setattr(app, "Daemon", lambda options, nft: started.append(options) or _Runner())
    monkeypatch.setattr(uvloop, "run", lambda coroutine: coroutine)
    monkeypatch.setattr(nodetuning, "apply", lambda writes: tuned.append(writes) or [])
    monkeypatch.setattr(nodetuning, "set_oom_score_adj", lambda value: tuned.append(value))
    monkeypatch.setattr(nodetuning, "cpu_count", lambda: 2)
    return started, tuned


def test_every_honoured_field_reaches_the_daemons_options(recorded):
    started, tuned = recorded
    args = resolved("--config", str(EVERY))
    args.proxy_mode, args.source = "kernel", "kube"  # the extension's userspace/manifests need more set-up
    assert cli._run(args, _FakeNft()) == 0
    (options,) = started
    assert (options.min_sync_period, options.sync_period) == (0.25, 3600)
    assert (options.healthz_bind, options.metrics_bind) == ("192.168.60.1:10256", "192.168.60.1:19249")
    assert options.primary_ip == "192.168.60.1" and options.bind_hard_fail is True
    assert options.feature_gates == {"KubeProxyNFTablesLocalhostNodePorts": False, "TopologyAwareHints": True}
    assert options.kube.kubeconfig == "/etc/dataplane/kubeconfig.conf"
    assert (options.kube.qps, options.kube.burst, options.kube.content_type) == (7.5, 20, "application/json")
    assert options.settings.masquerade_bit == 1 << 12 and options.settings.masquerade_all
    assert options.dns_bind == "192.168.60.1:53" and options.cluster_domain == "cluster.example"
    assert tuned[0] == -500 and tuned[1][0] == nodetuning.Write("net/netfilter/nf_conntrack_max", 4096)


def test_init_only_tunes_the_node_and_exits(recorded):
    started, tuned = recorded
    args = resolved("--source", "kube", "--init-only", "--oom-score-adj=-100")
    assert cli._run(args, _FakeNft()) == 0
    assert tuned[0] == -100 and len(tuned) == 2 and started == []  # tuned, and no daemon
    assert cli._run(resolved("--source", "kube"), _FakeNft()) == 0 and len(started) == 1


class _Runner:
    def run(self):
        return None


class _FakeNft:
    backend_name = "fake"


def test_bind_address_overrides_the_primary_node_ip(monkeypatch):
    import asyncio
    from types import SimpleNamespace

    from dataplane.daemon import app

    found = (["192.168.60.1", "192.168.60.2"], "192.168.60.2")
    monkeypatch.setattr(app.addresses, "node_addresses", lambda: found)
    settings = NodeSettings(node_name="n", nodeport_primary_only=True)

    def node_ips(primary_ip: str) -> tuple[str, ...]:
        fake = SimpleNamespace(options=SimpleNamespace(settings=settings, primary_ip=primary_ip), source=None,
                               node_ips=(), userspace=None)
        asyncio.run(app.Daemon.refresh_node_ips(fake))
        return fake.node_ips

    assert node_ips("") == ("192.168.60.2",)
    assert node_ips("192.168.60.1") == ("192.168.60.1",)


def test_bind_address_hard_fail(caplog):
    import asyncio
    import socket
    from types import SimpleNamespace

    from dataplane.daemon import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"127.0.0.1:{taken.getsockname()[1]}"

        def serve(hard_fail: bool):
            fake = SimpleNamespace(options=SimpleNamespace(bind_hard_fail=hard_fail))
            return asyncio.run(app.Daemon._serve(fake, bind, {"/healthz": lambda: (200, "text/plain", b"")}))

        assert serve(False) is None and "going on without it" in caplog.text
        with pytest.raises(OSError):
            serve(True)
        fake = SimpleNamespace(options=SimpleNamespace(bind_hard_fail=True))
        assert asyncio.run(app.Daemon._serve(fake, "", {})) is None  # "": that server is off


def test_render_takes_the_config_file_too(capsys):
    assert cli.main(["render", "--config", str(EVERY), "--source", str(ROOT / "examples"),
                     "--node-ips", "192.168.60.1"]) == 0
    out = capsys.readouterr().out
    assert "meta mark set meta mark | 0x1000" in out  # nftables.masqueradeBit 12
    assert "# userspace mode" in out  # the extension document's proxyMode
