"""Command line: `dataplane run | render | cleanup | status`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from .config import NodeSettings, parse_cidrs, select_nodeport_ips
from .daemon import http
from .daemon import kubeproxy_config as kpc
from .lb.policy import ALGORITHMS
from .nat import layout

EXIT_USAGE = 2
EXIT_NOT_ROOT = 3
EXIT_NO_NFTABLES = 4
EXIT_RUNTIME = 5


# The fields a LogRecord has before `extra=` adds any: what is left are structured figures.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _figures(record: logging.LogRecord) -> dict:
    """What a log call passed with `extra=`: the structured figures of the message."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """--logging-format json: one object a line; figures passed with `extra=` are keys of their own."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        entry = {"ts": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage(), **_figures(record)}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class LogfmtFormatter(logging.Formatter):
    """One line per event, key=value, so logs are grep- and machine-readable."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info).replace("\n", " | ")
        message = message.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        figures = "".join(f" {key}={json.dumps(value, default=str)}" for key, value in _figures(record).items())
        return (f'time={stamp}.{int(record.msecs):03d} level={record.levelname.lower()} logger={record.name} '
                f'msg="{message}"{figures}')


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataplane", description="A Kubernetes Service data plane on nftables.")
    commands = parser.add_subparsers(dest="command", required=True)

    proxy_flags = argparse.ArgumentParser(add_help=False)
    proxy_flags.add_argument("--source", default="/etc/dataplane/manifests",
                             help="a manifest file or a directory of them (YAML/JSON), or `kube`: the Kubernetes API")
    proxy_flags.add_argument("--allow-links", action="store_true",
                             help="follow symlinks in the manifest folder whose target lies outside it "
                                  "(default: refused, and logged)")
    proxy_flags.add_argument("--kubeconfig", default="",
                             help="with --source kube: a kubeconfig file (default: in-cluster service account)")
    proxy_flags.add_argument("--master", default="",
                             help="with --source kube: the API server's URL, overriding the kubeconfig's")
    proxy_flags.add_argument("--proxy-mode", default="kernel", type=_proxy_mode,
                             help="kernel (also kube-proxy's iptables, nftables): nftables picks endpoints; "
                                  "userspace: the first packet of each new flow is queued to the daemon, which "
                                  "picks (fail-open to the kernel's pick)")
    proxy_flags.add_argument("--queues", type=_positive, default=None,
                             help="userspace: NFQUEUE queues 0..N-1, a forwarder process each, packets fanned out "
                                  "by CPU (by address hash where the kernel has no fanout); 1: decided in the "
                                  "daemon itself (default: one per CPU)")
    proxy_flags.add_argument("--forwarder-cpus", type=_cpu_list, default=None,
                             help="userspace: CPUs for the forwarders, comma-separated, queue i on the i-th; "
                                  "'none': unpinned (default: each on its queue's CPU under fanout)")
    proxy_flags.add_argument("--busy-poll", type=_microseconds, default=0.0, metavar="MICROSECONDS",
                             help="userspace: a forwarder keeps reading this long after a batch before sleeping "
                                  "(spends CPU to save a wake-up; default 0: off)")
    proxy_flags.add_argument("--forwarder-loop", default="blocking", choices=["blocking", "event"],
                             help="userspace, in forwarder processes: packets read by a thread blocking in recv, "
                                  "or by the event loop (measured slower; see bench/README.md)")
    proxy_flags.add_argument("--lb-algorithm", default="random", choices=ALGORITHMS,
                             help="the algorithm of Services without a dataplane.io/lb-algorithm annotation "
                                  "(maglev: a kernel table in either mode; the others: userspace only)")
    proxy_flags.add_argument("--hostname-override", default="", help="this node's name (default: the hostname)")
    proxy_flags.add_argument("--cluster-cidr", default="",
                             help="Pod CIDRs, comma-separated; traffic from elsewhere to a ClusterIP is masqueraded")
    proxy_flags.add_argument("--nodeport-addresses", default="",
                             help="CIDRs whose node addresses serve NodePorts, or 'primary' (default: all but loopback)")
    proxy_flags.add_argument("--masquerade-all", **GO_BOOL, help="masquerade all Service traffic")
    proxy_flags.add_argument("--service-cidr", default="",
                             help="Service CIDRs, comma-separated; traffic to unallocated addresses in them is dropped")
    proxy_flags.add_argument("--node-zone", default="",
                             help="this node's topology.kubernetes.io/zone, for EndpointSlice zone hints")
    # ---- kube-proxy's flags, in its spelling (issue 12); their precedence with --config is
    # kube-proxy's (daemon/kubeproxy_config.py: resolve). Defaults are kube-proxy's unless the
    # README's flag table names a difference.
    kube = proxy_flags.add_argument_group("kube-proxy's flags")
    kube.add_argument("--config", default="",
                      help="a kube-proxy KubeProxyConfiguration file (YAML or JSON, kubeadm's config.conf); "
                           "it replaces kube-proxy's flags, as in kube-proxy")
    kube.add_argument("--cleanup", **GO_BOOL,
                      help="remove kube-proxy's and dataplane's rules from this node, then exit")
    kube.add_argument("--healthz-bind-address", default=f"0.0.0.0:{kpc.HEALTHZ_PORT}",
                      help="IP:port, or a bare IP (port 10256), for /healthz and /livez; \"\" turns it off")
    kube.add_argument("--metrics-bind-address", default=f"127.0.0.1:{kpc.METRICS_PORT}",
                      help="IP:port, or a bare IP (port 10249), for /metrics and /status; \"\" turns it off")
    kube.add_argument("--healthz-port", type=int, default=None, help="deprecated in kube-proxy: 0 turns /healthz off")
    kube.add_argument("--metrics-port", type=int, default=None, help="deprecated in kube-proxy: 0 turns /metrics off")
    kube.add_argument("--bind-address", default="0.0.0.0",
                      help="this node's primary IP (as in kube-proxy, no socket binds it); 0.0.0.0: from the Node")
    kube.add_argument("--bind-address-hard-fail", **GO_BOOL,
                      help="exit when the healthz or metrics address cannot be bound (default: log and go on)")
    kube.add_argument("--min-sync-period", "--iptables-min-sync-period", dest="min_sync_period",
                      type=_duration_or_seconds, default=1.0,
                      help="at most one sync this often (a Go duration like 1s, or seconds); bursts coalesce")
    kube.add_argument("--sync-period", "--iptables-sync-period", dest="sync_period",
                      type=_duration_or_seconds, default=300.0,
                      help="between full resyncs (a Go duration like 5m, or seconds)")
    kube.add_argument("--config-sync-period", type=_duration, default=900.0,
                      help="kube-proxy's informer resync; accepted (must be > 0), no effect here (see README)")
    kube.add_argument("--detect-local-mode", default="ClusterCIDR",
                      help="how Pod traffic is told apart: ClusterCIDR (the only mode implemented here)")
    kube.add_argument("--pod-bridge-interface", default="", help="with --detect-local-mode BridgeInterface")
    kube.add_argument("--pod-interface-name-prefix", default="", help="with --detect-local-mode InterfaceNamePrefix")
    kube.add_argument("--masquerade-bit", "--iptables-masquerade-bit", dest="masquerade_bit", type=int, default=14,
                      help="the fwmark bit (0-31) that marks packets to masquerade")
    kube.add_argument("--oom-score-adj", type=int, default=-999, help="this process's oom_score_adj [-1000, 1000]")
    kube.add_argument("--conntrack-max-per-core", type=int, default=32768,
                      help="nf_conntrack_max = this x CPUs (at least --conntrack-min); 0 leaves it as is")
    kube.add_argument("--conntrack-min", type=int, default=131072, help="the least nf_conntrack_max to set")
    kube.add_argument("--conntrack-tcp-timeout-established", type=_duration, default=86400.0,
                      help="nf_conntrack_tcp_timeout_established (0 leaves it as is)")
    kube.add_argument("--conntrack-tcp-timeout-close-wait", type=_duration, default=3600.0,
                      help="nf_conntrack_tcp_timeout_close_wait (0 leaves it as is)")
    kube.add_argument("--conntrack-tcp-be-liberal", **GO_BOOL, help="set nf_conntrack_tcp_be_liberal to 1")
    kube.add_argument("--conntrack-udp-timeout", type=_duration, default=0.0,
                      help="nf_conntrack_udp_timeout (0 leaves it as is)")
    kube.add_argument("--conntrack-udp-timeout-stream", type=_duration, default=0.0,
                      help="nf_conntrack_udp_timeout_stream (0 leaves it as is)")
    kube.add_argument("--feature-gates", type=_feature_gates, default={},
                      help="NAME=true|false,...; accepted and exported as kubernetes_feature_enabled")
    kube.add_argument("--kube-api-qps", type=float, default=5.0,
                      help="API requests a second, client-side (lists and watch opens; negative: no limit)")
    kube.add_argument("--kube-api-burst", type=int, default=10, help="API requests at once before --kube-api-qps")
    kube.add_argument("--kube-api-content-type", default="application/vnd.kubernetes.protobuf",
                      help="accepted; the client asks for and decodes JSON whatever is given (see README)")
    kube.add_argument("--v", dest="v", type=int, default=0, help="klog verbosity: 4 and above log debug lines")
    kube.add_argument("--logging-format", default="text", choices=["text", "json"],
                      help="text: key=value lines; json: one JSON object a line")
    kube.add_argument("--init-only", **GO_BOOL,
                      help="tune the node as --conntrack-* and --oom-score-adj say (the steps that need root), "
                           "then exit")
    for flag, (kind, why) in IGNORED_FLAGS.items():
        spelling = {**GO_BOOL, "default": None} if kind == "bool" else {
            "type": _IGNORED_TYPES[kind], "metavar": kind.upper()}
        kube.add_argument(flag, dest=_ignored_dest(flag), **spelling,
                          help=f"kube-proxy's; accepted, no effect: {why}")
    # ---- end of kube-proxy's flags
    proxy_flags.add_argument("--dns-bind-address", default="",
                             help="HOST:PORT to serve cluster DNS on, UDP and TCP (default: no DNS server)")
    proxy_flags.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS zone")
    proxy_flags.add_argument("--dns-upstream", default="",
                             help="resolvers for other names, IP[:PORT] comma-separated (default: /etc/resolv.conf)")
    proxy_flags.add_argument("--dns-ttl", type=int, default=5, help="seconds: TTL of DNS answers, negative ones too")
    proxy_flags.add_argument("-v", "--verbose", action="count", default=0)

    run = commands.add_parser("run", parents=[proxy_flags], help="run the daemon (root)")
    run.add_argument("--nftables-backend", default="netlink", choices=["netlink", "nft"],
                     help="how rules reach the kernel: netlink, one nfnetlink batch encoded here; nft, nft's "
                          "text through libnftables (or `nft -f`). Both are atomic (default: netlink)")
    render = commands.add_parser("render", parents=[proxy_flags], help="print the ruleset; touches nothing")
    render.add_argument("--node-ips", default=None,
                        help="node addresses to assume, comma-separated (default: this host's)")
    status = commands.add_parser("status", help="ask the running daemon what it programmed and how it balances")
    status.add_argument("--metrics-bind-address", default="127.0.0.1:10249", help="where the daemon serves /status")
    status.add_argument("--json", action="store_true", help="print the daemon's JSON as it is")
    status.add_argument("-v", "--verbose", action="count", default=0)
    cleanup = commands.add_parser("cleanup", help="remove every rule this program installed (root)")
    cleanup.add_argument("-v", "--verbose", action="count", default=0)
    cleanup.add_argument("--kube-proxy", "--cleanup", dest="kube_proxy", action="store_true",
                         help="also remove what kube-proxy left: its nftables tables, iptables KUBE-* chains")
    # `kube-proxy --cleanup --config FILE --v=2` spelled for us: the file and verbosity change nothing to clean.
    cleanup.add_argument("--config", default="", help=argparse.SUPPRESS)
    cleanup.add_argument("--v", dest="v", type=int, default=0, help=argparse.SUPPRESS)
    return parser


# ---- kube-proxy's flags and config file (issue 12)

# The dests of the flags kube-proxy also has: with --config, kube-proxy's precedence holds for these.
KUBE_PROXY_DESTS = (
    "kubeconfig", "kube_api_content_type", "kube_api_qps", "kube_api_burst", "hostname_override", "bind_address",
    "healthz_bind_address", "metrics_bind_address", "bind_address_hard_fail", "masquerade_bit", "masquerade_all",
    "sync_period", "min_sync_period", "detect_local_mode", "pod_bridge_interface", "pod_interface_name_prefix",
    "cluster_cidr", "nodeport_addresses", "oom_score_adj", "conntrack_max_per_core", "conntrack_min",
    "conntrack_tcp_timeout_established", "conntrack_tcp_timeout_close_wait", "conntrack_tcp_be_liberal",
    "conntrack_udp_timeout", "conntrack_udp_timeout_stream", "config_sync_period", "feature_gates",
    "v", "logging_format",
)


# kube-proxy flags that mean nothing here: accepted in kube-proxy's syntax (so its DaemonSet's
# arguments still start the daemon) and logged once as ignored. Flag -> (value kind, why).
IGNORED_FLAGS = {
    "--iptables-localhost-nodeports": ("bool", kpc.LOCALHOST_NODEPORTS),
    **{f"--ipvs-{name}": ("duration", kpc.IPVS) for name in (
        "sync-period", "min-sync-period", "tcp-timeout", "tcpfin-timeout", "udp-timeout")},
    "--ipvs-scheduler": ("string", kpc.IPVS),
    "--ipvs-exclude-cidrs": ("string", kpc.IPVS),
    "--ipvs-strict-arp": ("bool", kpc.IPVS),
    "--profiling": ("bool", kpc.NO_PPROF),
    "--show-hidden-metrics-for-version": ("string", kpc.NO_HIDDEN_METRICS),
    "--vmodule": ("string", kpc.VMODULE),
    "--log-flush-frequency": ("duration", kpc.UNBUFFERED),
    "--log-json-info-buffer-size": ("string", kpc.UNBUFFERED),
    "--log-json-split-stream": ("bool", "every log line goes to stderr"),
    "--log-text-info-buffer-size": ("string", kpc.UNBUFFERED),
    "--log-text-split-stream": ("bool", "every log line goes to stderr"),
}


def _ignored_dest(flag: str) -> str:
    return "ignored_" + flag.lstrip("-").replace("-", "_")


def _go_bool(text: str) -> bool:
    """A Go bool flag's value, as strconv.ParseBool reads it."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


# A kube-proxy bool flag in pflag's syntax: `--masquerade-all`, `--masquerade-all=true|false`.
GO_BOOL = {"nargs": "?", "const": True, "default": False, "type": _go_bool, "metavar": "BOOL"}


def log_ignored_flags(args: argparse.Namespace, log: logging.Logger) -> None:
    for flag, (_, why) in IGNORED_FLAGS.items():
        if getattr(args, _ignored_dest(flag), None) is not None:
            log.info("%s is ignored: %s", flag, why)


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the options spelled out in `argv` (kube-proxy's Changed()); abbreviations included."""
    spelled = set()
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            spelled.add(token.split("=", 1)[0])
        elif token.startswith("-") and len(token) > 1 and not token[1].isdigit():
            spelled.add(token[:2])
    actions = _run_actions(parser)
    exact = {option for action in actions for option in action.option_strings}
    given = set()
    for action in actions:
        for option in action.option_strings:
            if option in spelled or (option.startswith("--") and any(
                    s not in exact and len(s) > 3 and option.startswith(s) for s in spelled)):
                given.add(action.dest)
    return given


def _run_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["run"]._actions


def apply_config(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser,
                 log: logging.Logger) -> None:
    """With --config: the file's values replace kube-proxy's flags, by kube-proxy's precedence."""
    if not getattr(args, "config", ""):
        return
    loaded = kpc.load(args.config)
    given = given_flags(parser, argv)
    defaults = {a.dest: a.default for a in _run_actions(parser) if a.dest in KUBE_PROXY_DESTS}
    resolution = kpc.resolve(loaded, given, defaults, {dest: getattr(args, dest) for dest in kpc.FLAGS_OVER_FILE})
    for dest, value in resolution.values.items():
        setattr(args, dest, value)
    if "source" not in given and "source" not in loaded.extension:
        args.source = "kube"  # kube-proxy always reads the API server
    _configure_logging(args)  # the file may set the format and verbosity
    log.info("config %s: mode %r: kernel mode (nftables)", args.config, loaded.mode)
    for problem in loaded.lenient:  # kube-proxy logs its strict decoding error and goes on leniently
        log.warning("config %s: %s: ignored, as kube-proxy's lenient decoding does", args.config, problem)
    for name, why in loaded.ignored:
        log.info("config %s: %s is ignored: %s", args.config, name, why)
    for dest in resolution.overridden:
        log.warning("--%s is ignored: --config %s replaces it, as in kube-proxy", dest.replace("_", "-"),
                    args.config)


def check_kube_proxy_flags(args: argparse.Namespace) -> None:
    """Values kube-proxy would accept but that have no implementation here: a clear usage error."""
    mode = args.detect_local_mode
    if mode not in kpc.LOCAL_MODES:
        raise ValueError(f"detect-local-mode {mode!r}: only ClusterCIDR is implemented here "
                         "(Pod traffic is told apart by --cluster-cidr)")
    if not 0 <= args.masquerade_bit <= 31:
        raise ValueError(f"masquerade-bit {args.masquerade_bit}: must be within [0, 31]")
    if not -1000 <= args.oom_score_adj <= 1000:
        raise ValueError(f"oom-score-adj {args.oom_score_adj}: must be within [-1000, 1000]")
    for name in ("conntrack_max_per_core", "conntrack_min", "kube_api_burst"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name.replace('_', '-')}: must not be negative")
    if args.config_sync_period <= 0:
        raise ValueError("config-sync-period: must be greater than 0")
    if args.hostname_override and not args.hostname_override.strip():
        raise ValueError(f"hostname-override {args.hostname_override!r}: empty hostname-override is invalid")
    kpc.media_type(args.kube_api_content_type, "kube-api-content-type")


def bind_addresses(args: argparse.Namespace) -> tuple[str, str]:
    """(healthz, metrics) as HOST:PORT, "" for off: kube-proxy's spellings and its deprecated port flags."""
    healthz = kpc.bind_address(args.healthz_bind_address, kpc.HEALTHZ_PORT, "healthz-bind-address")
    metrics = kpc.bind_address(args.metrics_bind_address, kpc.METRICS_PORT, "metrics-bind-address")
    if not getattr(args, "config", ""):
        healthz = _with_port(healthz, args.healthz_port)
        metrics = _with_port(metrics, args.metrics_port)
    return healthz, metrics


def _with_port(address: str, port: int | None) -> str:
    if port is None or not address:
        return address
    if port == 0:
        return ""
    host, _ = http.split_host_port(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _nodeport_addresses(text: str) -> tuple[tuple[str, ...], bool]:
    """(CIDRs, primary only) from --nodeport-addresses / nodePortAddresses, with kube-proxy's keywords."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if "localhost" in parts:
        raise ValueError("nodeport-addresses: 'localhost': NodePorts never answer on loopback here")
    primary = "primary" in parts
    cidrs = [p for p in parts if p not in ("primary", "all")]
    if "all" in parts:
        return (), primary and False
    return parse_cidrs(",".join(cidrs), "--nodeport-addresses"), primary


def settings_from(args: argparse.Namespace) -> NodeSettings:
    bind_addresses(args)
    check_kube_proxy_flags(args)
    cidrs, primary = _nodeport_addresses(args.nodeport_addresses)
    return NodeSettings(
        node_name=(args.hostname_override.strip() or socket.gethostname()).lower(),
        cluster_cidrs=parse_cidrs(args.cluster_cidr, "--cluster-cidr"),
        masquerade_all=args.masquerade_all,
        nodeport_cidrs=cidrs,
        nodeport_primary_only=primary,
        masquerade_bit=1 << args.masquerade_bit,
        service_cidrs=parse_cidrs(args.service_cidr, "--service-cidr"),
        node_zone=args.node_zone,
        lb_algorithm=getattr(args, "lb_algorithm", "random"),
    )


def _configure_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    json_format = getattr(args, "logging_format", "text") == "json"
    handler.setFormatter(JsonFormatter() if json_format else LogfmtFormatter())
    debug = args.verbose > 1 or getattr(args, "v", 0) >= 4
    handler._dataplane = True  # ours, replaced when the config file changes the format
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_dataplane", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every batch of events


def klog_verbosity(argv: list[str]) -> list[str]:
    """kube-proxy's `-v=N`, `-v N` and `-vN` (klog's level, a pflag shorthand) as `--v=N`; our bare
    `-v`/`-vv` stay counts."""
    spelled, at = [], 0
    while at < len(argv):
        token = argv[at]
        if token == "--":
            return spelled + argv[at:]
        if token.startswith("-v=") and token[3:].isdigit():
            token = "--v=" + token[3:]
        elif token.startswith("-v") and token[2:].isdigit():
            token = "--v=" + token[2:]
        elif token == "-v" and at + 1 < len(argv) and argv[at + 1].isdigit():
            token, at = "--v=" + argv[at + 1], at + 1
        spelled.append(token)
        at += 1
    return spelled


def main(argv: list[str] | None = None) -> int:
    argv = klog_verbosity(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        # kube-proxy's command line has no subcommand (`kube-proxy --cleanup --config FILE --v=2`):
        # read it as `run`, which takes every kube-proxy flag; its --cleanup cleans up and exits.
        argv = ["run", *argv]
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    log = logging.getLogger("dataplane")
    try:
        if args.command in ("run", "render"):
            apply_config(args, argv[1:], parser, log)
            log_ignored_flags(args, log)
        if args.command == "run":
            if args.cleanup:
                args.command, args.kube_proxy = "cleanup", True
        if args.command == "render":
            return _render(args)
        if args.command == "status":
            return _status(args)
        if os.geteuid() != 0:
            log.error("%s needs root (CAP_NET_ADMIN) to program nftables", args.command)
            return EXIT_NOT_ROOT
        from .nat.nftables import NftError, Nftables

        try:
            nft = Nftables(applier=getattr(args, "nftables_backend", "nft"))
            nft.probe()
        except NftError as error:
            log.error("nftables is not usable: %s", error)
            return EXIT_NO_NFTABLES
        if args.command == "cleanup":
            return _cleanup(args, nft, log)
        return _run(args, nft)
    except ValueError as error:
        log.error("%s", error)
        return EXIT_USAGE
    except OSError as error:  # e.g. a bind address already in use
        log.error("cannot start: %s", error)
        return EXIT_RUNTIME


def _cleanup(args: argparse.Namespace, nft, log: logging.Logger) -> int:
    for family in ("ip", "ip6"):
        nft.delete_table(family, layout.TABLE)
    from .daemon.userspace import remove_queue_rules

    remove_queue_rules()
    log.info("removed table %s from ip and ip6, and the NFQUEUE rules of userspace mode", layout.TABLE)
    if getattr(args, "kube_proxy", False):
        from .daemon.kubeproxy_cleanup import remove_kube_proxy

        report = remove_kube_proxy(nft)
        for line in report.lines():
            log.info("kube-proxy cleanup: %s", line)
        if report.failures:
            return 1
    return 0


def _duration(text: str) -> float:
    try:
        return kpc.parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _duration_or_seconds(text: str) -> float:
    try:
        return kpc.parse_duration(text, bare_seconds=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_IGNORED_TYPES = {"duration": lambda text: str(_duration(text)), "string": str}


def _feature_gates(text: str) -> dict[str, bool]:
    try:
        return kpc.feature_gates(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _proxy_mode(text: str) -> str:
    """Ours (kernel, userspace) and kube-proxy's: iptables and nftables mean kernel mode."""
    if text in ("kernel", "userspace"):
        return text
    if text in ("iptables", "nftables", ""):
        return "kernel"
    if text in kpc.REFUSED_MODES:
        raise argparse.ArgumentTypeError(kpc.REFUSED_MODES[text].replace("mode ", "", 1))
    raise argparse.ArgumentTypeError(f"{text!r}: kernel, userspace (or kube-proxy's iptables, nftables)")
# ---- end of kube-proxy's flags and config file


def api_settings(args: argparse.Namespace):
    """ApiSettings for `--source kube`, None for manifests; raises ValueError for API flags without it."""
    if args.source != "kube":
        # (A config file's clientConnection.kubeconfig is simply unused with a manifest source.)
        if args.master or (args.kubeconfig and not getattr(args, "config", "")):
            raise ValueError("--kubeconfig and --master need --source kube")
        return None
    from .sync.kube import ApiSettings

    return ApiSettings(kubeconfig=args.kubeconfig, master=args.master, qps=args.kube_api_qps,
                       burst=args.kube_api_burst, content_type=args.kube_api_content_type)


def _render(args: argparse.Namespace) -> int:
    from .nat.plan import full
    from .nat.render import render
    from .netlink.addresses import node_addresses
    from .sync.manifests import ManifestSource
    from .sync.store import Store

    settings = settings_from(args)
    if api_settings(args) is not None:
        raise ValueError("render reads manifests (--source PATH); --source kube is for `run`")
    store = Store()
    from .sync.reader import Limits

    ManifestSource(Path(args.source), store, Limits(allow_links=args.allow_links)).load_all()
    if args.node_ips is not None:
        found = [ip.strip() for ip in args.node_ips.split(",") if ip.strip()]
        primary = found[0] if found else None
    else:
        found, primary = node_addresses()
    snapshot = store.snapshot()
    ruleset = render(snapshot, settings, select_nodeport_ips(settings, found, primary))
    if args.proxy_mode == "userspace":
        from .nat.userspace import QueueSpec, UserspaceRules
        from .nat.xtables import Xtables
        from .queue.workers import default_queue_count

        count = args.queues or default_queue_count()
        # As on a kernel without nft's queue: the rule goes to iptables.
        queue = QueueSpec(count=count, fanout=count > 1)
        ruleset = UserspaceRules(settings, layout.Family(4), queue).extend(ruleset, snapshot)
        sys.stdout.write("# userspace mode; with `iptables-restore --noflush`:\n")
        sys.stdout.write("".join(f"#   {line}\n" for line in Xtables(4).script(queue).splitlines()))
    transaction, _ = full(ruleset)
    sys.stdout.write(str(transaction))
    return 0


def _status(args: argparse.Namespace) -> int:
    import json
    import urllib.request

    from .daemon.status import format_status

    host, port = http.split_host_port(
        kpc.bind_address(args.metrics_bind_address, kpc.METRICS_PORT, "metrics-bind-address") or "127.0.0.1:10249")
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as error:
        logging.getLogger("dataplane").error("no daemon answers at %s: %s", url, error)
        return 1
    if args.json:
        print(json.dumps(body, indent=1))
    elif body.get("mode") == "kernel":
        from .daemon.status import format_kernel_status

        format_kernel_status(body)
    else:
        format_status(body)
        for entry in body.get("paths", []):  # which path each Service port takes (nat/tables.balancing_paths)
            slots = f", {entry['table_slots']} slots" if entry.get("table_slots") else ""
            print(f"{entry['service']} ({entry['family']})  {' + '.join(entry['paths'])}{slots}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _cpu_list(text: str) -> tuple[int, ...]:
    if text.strip() == "none":
        return ()
    try:
        cpus = tuple(int(c) for c in text.split(","))
    except ValueError:
        cpus = (-1,)
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'none' or CPU numbers separated by commas")
    return cpus


def _microseconds(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text} is not 0..1000000 microseconds")
    return value / 1e6


def _run(args: argparse.Namespace, nft) -> int:
    import uvloop

    from .daemon import nodetuning
    from .daemon.app import Daemon, Options

    healthz, metrics = bind_addresses(args)
    settings = settings_from(args)
    kube = api_settings(args)
    # Node tuning as kube-proxy does it at start (issue 12); failures are warnings.
    nodetuning.set_oom_score_adj(args.oom_score_adj)
    nodetuning.apply(nodetuning.plan(nodetuning.Conntrack(
        max_per_core=args.conntrack_max_per_core, min=args.conntrack_min,
        tcp_established_timeout=args.conntrack_tcp_timeout_established,
        tcp_close_wait_timeout=args.conntrack_tcp_timeout_close_wait,
        tcp_be_liberal=args.conntrack_tcp_be_liberal, udp_timeout=args.conntrack_udp_timeout,
        udp_stream_timeout=args.conntrack_udp_timeout_stream), nodetuning.cpu_count()))
    if args.init_only:  # kube-proxy's --init-only: what needs full root is done; the daemon runs later
        logging.getLogger("dataplane").info("--init-only: the node is tuned; exiting")
        return 0
    options = Options(
        source=Path(args.source),
        settings=settings,
        healthz_bind=healthz,
        metrics_bind=metrics,
        min_sync_period=args.min_sync_period,
        sync_period=args.sync_period,
        dns_bind=args.dns_bind_address,
        cluster_domain=args.cluster_domain,
        dns_upstream=args.dns_upstream,
        dns_ttl=args.dns_ttl,
        kube=kube,
        proxy_mode=args.proxy_mode,
        queues=args.queues,
        forwarder_cpus=args.forwarder_cpus,
        busy_poll=args.busy_poll,
        forwarder_loop=args.forwarder_loop,
        lb_algorithm=args.lb_algorithm,
        allow_links=args.allow_links,
        primary_ip=_primary_ip(args.bind_address),
        bind_hard_fail=args.bind_address_hard_fail,
        feature_gates=dict(args.feature_gates),
    )
    logging.getLogger("dataplane").info(
        "starting: source=%s node=%s nftables=%s", options.source, options.settings.node_name, nft.backend_name
    )
    uvloop.run(Daemon(options, nft).run())
    return 0


def _primary_ip(text: str) -> str:
    """--bind-address / bindAddress: kube-proxy's override of the node's primary IP; 0.0.0.0 and :: mean none."""
    import ipaddress

    text = text.strip()
    if not text:
        return ""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"bind-address: {text!r} is not an IP address") from None
    return "" if ip.is_unspecified else str(ip)


if __name__ == "__main__":
    sys.exit(main())
