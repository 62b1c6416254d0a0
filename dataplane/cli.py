"""Command line: `dataplane run | render | cleanup | status`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from .config import NodeSettings, parse_cidrs, select_nodeport_ips
from .daemon import http
from .lb.policy import ALGORITHMS
from .nat import layout

EXIT_USAGE = 2
EXIT_NOT_ROOT = 3
EXIT_NO_NFTABLES = 4
EXIT_RUNTIME = 5


class LogfmtFormatter(logging.Formatter):
    """One line per event, key=value, so logs are grep- and machine-readable."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info).replace("\n", " | ")
        message = message.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        return f'time={stamp}.{int(record.msecs):03d} level={record.levelname.lower()} logger={record.name} msg="{message}"'


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dataplane", description="A Kubernetes Service data plane on nftables.")
    commands = parser.add_subparsers(dest="command", required=True)

    proxy_flags = argparse.ArgumentParser(add_help=False)
    proxy_flags.add_argument("--source", default="/etc/dataplane/manifests",
                             help="a manifest file or a directory of them (YAML/JSON), or `kube`: the Kubernetes API")
    proxy_flags.add_argument("--kubeconfig", default="",
                             help="with --source kube: a kubeconfig file (default: in-cluster service account)")
    proxy_flags.add_argument("--master", default="",
                             help="with --source kube: the API server's URL, overriding the kubeconfig's")
    proxy_flags.add_argument("--proxy-mode", default="kernel", choices=["kernel", "userspace"],
                             help="kernel: nftables picks endpoints; userspace: the first packet of each new flow "
                                  "is queued to the daemon, which picks (fail-open to the kernel's pick)")
    proxy_flags.add_argument("--queues", type=_positive, default=1,
                             help="userspace: NFQUEUE queues 0..N-1; the kernel spreads flows over them by hash")
    proxy_flags.add_argument("--lb-algorithm", default="random", choices=ALGORITHMS,
                             help="the algorithm of Services without a dataplane.io/lb-algorithm annotation "
                                  "(maglev: a kernel table in either mode; the others: userspace only)")
    proxy_flags.add_argument("--hostname-override", default="", help="this node's name (default: the hostname)")
    proxy_flags.add_argument("--cluster-cidr", default="",
                             help="Pod CIDRs, comma-separated; traffic from elsewhere to a ClusterIP is masqueraded")
    proxy_flags.add_argument("--nodeport-addresses", default="",
                             help="CIDRs whose node addresses serve NodePorts, or 'primary' (default: all but loopback)")
    proxy_flags.add_argument("--masquerade-all", action="store_true", help="masquerade all Service traffic")
    proxy_flags.add_argument("--service-cidr", default="",
                             help="Service CIDRs, comma-separated; traffic to unallocated addresses in them is dropped")
    proxy_flags.add_argument("--node-zone", default="",
                             help="this node's topology.kubernetes.io/zone, for EndpointSlice zone hints")
    proxy_flags.add_argument("--healthz-bind-address", default="0.0.0.0:10256")
    proxy_flags.add_argument("--metrics-bind-address", default="127.0.0.1:10249")
    proxy_flags.add_argument("--min-sync-period", type=float, default=1.0,
                             help="seconds: at most one sync this often; bursts of changes coalesce")
    proxy_flags.add_argument("--sync-period", type=float, default=300.0,
                             help="seconds between full resyncs")
    proxy_flags.add_argument("--dns-bind-address", default="",
                             help="HOST:PORT to serve cluster DNS on, UDP and TCP (default: no DNS server)")
    proxy_flags.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS zone")
    proxy_flags.add_argument("--dns-upstream", default="",
                             help="resolvers for other names, IP[:PORT] comma-separated (default: /etc/resolv.conf)")
    proxy_flags.add_argument("--dns-ttl", type=int, default=5, help="seconds: TTL of DNS answers, negative ones too")
    proxy_flags.add_argument("-v", "--verbose", action="count", default=0)

    commands.add_parser("run", parents=[proxy_flags], help="run the daemon (root)")
    render = commands.add_parser("render", parents=[proxy_flags], help="print the ruleset; touches nothing")
    render.add_argument("--node-ips", default=None,
                        help="node addresses to assume, comma-separated (default: this host's)")
    status = commands.add_parser("status", help="ask the running daemon how it balances (userspace mode)")
    status.add_argument("--metrics-bind-address", default="127.0.0.1:10249", help="where the daemon serves /status")
    status.add_argument("--json", action="store_true", help="print the daemon's JSON as it is")
    status.add_argument("-v", "--verbose", action="count", default=0)
    commands.add_parser("cleanup", parents=[argparse.ArgumentParser(add_help=False)],
                        help="remove every rule this program installed (root)").add_argument(
        "-v", "--verbose", action="count", default=0)
    return parser


def settings_from(args: argparse.Namespace) -> NodeSettings:
    nodeport = args.nodeport_addresses.strip()
    for bind in (args.healthz_bind_address, args.metrics_bind_address):
        http.split_host_port(bind)
    return NodeSettings(
        node_name=(args.hostname_override or socket.gethostname()).lower(),
        cluster_cidrs=parse_cidrs(args.cluster_cidr, "--cluster-cidr"),
        masquerade_all=args.masquerade_all,
        nodeport_cidrs=() if nodeport in ("", "primary") else parse_cidrs(nodeport, "--nodeport-addresses"),
        nodeport_primary_only=nodeport == "primary",
        service_cidrs=parse_cidrs(args.service_cidr, "--service-cidr"),
        node_zone=args.node_zone,
        lb_algorithm=getattr(args, "lb_algorithm", "random"),
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, handlers=[handler])
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every batch of events
    log = logging.getLogger("dataplane")
    try:
        if args.command == "render":
            return _render(args)
        if args.command == "status":
            return _status(args)
        if os.geteuid() != 0:
            log.error("%s needs root (CAP_NET_ADMIN) to program nftables", args.command)
            return EXIT_NOT_ROOT
        from .nat.nftables import NftError, Nftables

        try:
            nft = Nftables()
            nft.run("list tables")
        except NftError as error:
            log.error("nftables is not usable: %s", error)
            return EXIT_NO_NFTABLES
        if args.command == "cleanup":
            for family in ("ip", "ip6"):
                nft.delete_table(family, layout.TABLE)
            from .daemon.userspace import remove_queue_rules

            remove_queue_rules()
            log.info("removed table %s from ip and ip6, and the NFQUEUE rules of userspace mode", layout.TABLE)
            return 0
        return _run(args, nft)
    except ValueError as error:
        log.error("%s", error)
        return EXIT_USAGE
    except OSError as error:  # e.g. a bind address already in use
        log.error("cannot start: %s", error)
        return EXIT_RUNTIME


def api_settings(args: argparse.Namespace):
    """ApiSettings for `--source kube`, None for manifests; raises ValueError for API flags without it."""
    if args.source != "kube":
        if args.kubeconfig or args.master:
            raise ValueError("--kubeconfig and --master need --source kube")
        return None
    from .sync.kube import ApiSettings

    return ApiSettings(kubeconfig=args.kubeconfig, master=args.master)


def _render(args: argparse.Namespace) -> int:
    from .model import Snapshot  # noqa: F401  (keeps render import-light)
    from .nat.plan import full
    from .nat.render import render
    from .netlink.addresses import node_addresses
    from .sync.manifests import ManifestSource
    from .sync.store import Store

    settings = settings_from(args)
    if api_settings(args) is not None:
        raise ValueError("render reads manifests (--source PATH); --source kube is for `run`")
    store = Store()
    ManifestSource(Path(args.source), store).load_all()
    if args.node_ips is not None:
        found, primary = [ip.strip() for ip in args.node_ips.split(",") if ip.strip()], None
        primary = found[0] if found else None
    else:
        found, primary = node_addresses()
    snapshot = store.snapshot()
    ruleset = render(snapshot, settings, select_nodeport_ips(settings, found, primary))
    if args.proxy_mode == "userspace":
        from .nat.userspace import QueueSpec, UserspaceRules
        from .nat.xtables import Xtables

        queue = QueueSpec(count=args.queues)  # as on a kernel without nft's queue: the rule goes to iptables
        ruleset = UserspaceRules(settings, layout.Family(4), queue).extend(ruleset, snapshot)
        sys.stdout.write("# userspace mode; with `iptables-restore --noflush`:\n")
        sys.stdout.write("".join(f"#   {line}\n" for line in Xtables(4).script(queue).splitlines()))
    transaction, _ = full(ruleset)
    sys.stdout.write(str(transaction))
    return 0


def _status(args: argparse.Namespace) -> int:
    import json
    import urllib.request

    from .daemon.userspace import format_status

    host, port = http.split_host_port(args.metrics_bind_address)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
    except (OSError, ValueError) as error:
        logging.getLogger("dataplane").error("no daemon answers at %s: %s", url, error)
        return 1
    if args.json:
        print(json.dumps(body, indent=1))
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


def _run(args: argparse.Namespace, nft) -> int:
    import uvloop

    from .daemon.app import Daemon, Options

    options = Options(
        source=Path(args.source),
        settings=settings_from(args),
        healthz_bind=args.healthz_bind_address,
        metrics_bind=args.metrics_bind_address,
        min_sync_period=args.min_sync_period,
        sync_period=args.sync_period,
        dns_bind=args.dns_bind_address,
        cluster_domain=args.cluster_domain,
        dns_upstream=args.dns_upstream,
        dns_ttl=args.dns_ttl,
        kube=api_settings(args),
        proxy_mode=args.proxy_mode,
        queues=args.queues,
        lb_algorithm=args.lb_algorithm,
    )
    logging.getLogger("dataplane").info(
        "starting: source=%s node=%s nftables=%s", options.source, options.settings.node_name, nft.backend_name
    )
    uvloop.run(Daemon(options, nft).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
