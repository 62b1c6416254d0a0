#!/usr/bin/env bash
# Provisions a Debian machine as a dataplane node serving the README's demo. Idempotent: a
# second run converges to the same state and restarts nothing that is already right.
#
#   vagrant/provision.sh --host              the node is this machine (the Vagrant VM): demo Pods are
#                                            namespaces wired to its root namespace, rules go there
#   vagrant/provision.sh --netns PREFIX      the node is namespace PREFIXnode (CI, any shared machine),
#                                            with a client PREFIXclient (192.168.50.2) in front: the
#                                            daemon and the demo live in namespaces this script makes;
#                                            the root namespace's links, routes, rules and sysctls
#                                            are never touched
#   vagrant/provision.sh --netns PREFIX --remove    stops and deletes what --netns PREFIX made
#
# Installs: Debian packages; the project into /opt/dataplane/venv; the unit
# deploy/systemd/dataplane.service as /etc/systemd/system/dataplane.service; the demo manifests
# (examples/*.yaml) into /etc/dataplane/manifests. Where systemd is PID 1 (the VM) it enables and
# starts the unit. Where it is not (containers, CI), it says so and starts the unit's exact
# ExecStart command line itself, in the background, with a pid file.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX_DIR=/opt/dataplane
UNIT=/etc/systemd/system/dataplane.service
MANIFESTS=/etc/dataplane/manifests
POD_GATEWAY=10.244.1.1
DEMO_SERVICE=10.96.0.10:8080
PODS=(pod1 pod2 pod3)
declare -A POD_IP=([pod1]=10.244.1.11 [pod2]=10.244.1.12 [pod3]=10.244.1.13)

mode="" prefix="" remove=0
while [ $# -gt 0 ]; do
    case "$1" in
        --host) mode=host ;;
        --netns) mode=netns; prefix="${2:?--netns needs a PREFIX}"; shift ;;
        --remove) remove=1 ;;
        *) echo "provision.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$mode" ]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    echo "provision.sh: say where the node is: --host (a VM of its own) or --netns PREFIX" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "provision.sh: run as root" >&2
    exit 1
fi
case "$prefix" in *[!a-zA-Z0-9-]*) echo "provision.sh: PREFIX: letters, digits and dashes only" >&2; exit 2 ;; esac

say() { echo "== $*"; }

if [ "$mode" = netns ]; then
    NODE_NS="${prefix}node"
    PIDFILE="/run/dataplane-${prefix}node.pid"
    LOG="/var/log/dataplane-${prefix}node.log"
    CLIENT_NS="${prefix}client"
    in_node() { ip netns exec "$NODE_NS" "$@"; }
    in_client() { ip netns exec "$CLIENT_NS" "$@"; }
    pod_ns() { echo "${prefix}$1"; }
else
    NODE_NS=""
    PIDFILE=/run/dataplane.pid
    LOG=/var/log/dataplane.log
    in_node() { "$@"; }
    in_client() { "$@"; }  # the VM itself is the client
    pod_ns() { echo "dp-$1"; }
fi

stop_pidfile() {
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
}

delete_ns() {
    local ns="$1" pids
    [ -e "/run/netns/$ns" ] || return 0
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
    sleep 0.2
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    ip netns del "$ns"
}

if [ "$remove" = 1 ]; then
    [ "$mode" = netns ] || { echo "provision.sh: --remove is for --netns" >&2; exit 2; }
    stop_pidfile
    for pod in "${PODS[@]}"; do delete_ns "$(pod_ns "$pod")"; done
    delete_ns "$CLIENT_NS"
    delete_ns "$NODE_NS"
    say "removed the namespaces ${prefix}*"
    exit 0
fi

# ---- 1. Debian packages ---------------------------------------------------------------------------
packages=(nftables libnftables1 conntrack iproute2 procps curl python3 python3-venv)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Debian packages: all there"
fi

# ---- 2. the project ---------------------------------------------------------------------------------
source_hash="$(cd "$SRC" && find pyproject.toml dataplane -name '*.py' -o -name pyproject.toml | sort \
    | xargs sha256sum | sha256sum | cut -d' ' -f1)"
changed=0
if [ ! -x "$PREFIX_DIR/venv/bin/dataplane" ] || [ "$(cat "$PREFIX_DIR/.source-hash" 2>/dev/null)" != "$source_hash" ]; then
    say "installing dataplane from $SRC into $PREFIX_DIR/venv"
    [ -x "$PREFIX_DIR/venv/bin/python" ] || python3 -m venv "$PREFIX_DIR/venv"
    "$PREFIX_DIR/venv/bin/python" -m pip install -q --disable-pip-version-check "$SRC"
    echo "$source_hash" > "$PREFIX_DIR/.source-hash"
    changed=1
else
    say "dataplane in $PREFIX_DIR/venv is up to date"
fi

# ---- 3. the unit and the demo manifests -------------------------------------------------------------
install_file() {  # install_file SOURCE TARGET: copies when different; sets changed=1 then
    if ! cmp -s "$1" "$2"; then
        install -D -m 0644 "$1" "$2"
        say "installed $2"
        changed=1
    fi
}
install_file "$SRC/deploy/systemd/dataplane.service" "$UNIT"
mkdir -p "$MANIFESTS"
if ! compgen -G "$SRC/examples/*.yaml" >/dev/null; then
    echo "provision.sh: no demo manifests in $SRC/examples/" >&2
    exit 1
fi
for manifest in "$SRC"/examples/*.yaml; do
    install_file "$manifest" "$MANIFESTS/$(basename "$manifest")"
done

# ---- 4. the demo Pods: namespaces with an HTTP server each --------------------------------------------
if [ "$mode" = netns ]; then
    if [ ! -e "/run/netns/$NODE_NS" ]; then
        ip netns add "$NODE_NS"
        ip -n "$NODE_NS" link set lo up
        say "made the node namespace $NODE_NS"
    fi
    if [ ! -e "/run/netns/$CLIENT_NS" ]; then
        # A client in front of the node, as in the README demo; the node's default route
        # points at it, as a node's points at its upstream.
        ip netns add "$CLIENT_NS"
        ip -n "$CLIENT_NS" link set lo up
        ip -n "$NODE_NS" link add client type veth peer name eth0 netns "$CLIENT_NS"
        ip -n "$NODE_NS" address add 192.168.50.1/24 dev client
        ip -n "$NODE_NS" link set client up
        ip -n "$NODE_NS" route add default via 192.168.50.2
        ip -n "$CLIENT_NS" address add 192.168.50.2/24 dev eth0
        ip -n "$CLIENT_NS" link set eth0 up
        ip -n "$CLIENT_NS" route add default via 192.168.50.1
        ip netns exec "$NODE_NS" sysctl -q -w net.ipv4.ip_forward=1
        say "made the client namespace $CLIENT_NS (192.168.50.2) in front of the node (192.168.50.1)"
    fi
    node_ip() { ip -n "$NODE_NS" "$@"; }
else
    sysctl -q -w net.ipv4.ip_forward=1  # the VM routes for its Pods, as a node does
    node_ip() { ip "$@"; }
fi
for pod in "${PODS[@]}"; do
    ns="$(pod_ns "$pod")"
    if [ ! -e "/run/netns/$ns" ]; then
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    fi
    if ! node_ip link show "$pod" >/dev/null 2>&1; then
        node_ip link add "$pod" type veth peer name eth0 netns "$ns"
        node_ip address add "$POD_GATEWAY/32" dev "$pod"
        node_ip link set "$pod" up
        node_ip route add "${POD_IP[$pod]}/32" dev "$pod" scope link
        ip -n "$ns" address add "${POD_IP[$pod]}/32" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add "$POD_GATEWAY/32" dev eth0 scope link
        ip -n "$ns" route add default via "$POD_GATEWAY" dev eth0
        say "wired Pod $pod (${POD_IP[$pod]}) in namespace $ns"
    fi
    if [ -z "$(ip netns pids "$ns")" ]; then
        ip netns exec "$ns" setsid "$PREFIX_DIR/venv/bin/python" -m dataplane.lab.echo --name "$pod" --http 80 \
            </dev/null >/dev/null 2>&1 &
        say "started the HTTP server of $pod"
    fi
done

# ---- 5. the service --------------------------------------------------------------------------------------
exec_start="$(sed -n 's/^ExecStart=//p' "$UNIT")"
if [ "$mode" = host ] && [ "$(ps -p 1 -o comm= 2>/dev/null)" = systemd ]; then
    systemctl daemon-reload
    systemctl enable -q dataplane.service
    if [ "$changed" = 1 ]; then systemctl restart dataplane.service; else systemctl start dataplane.service; fi
    say "systemd runs dataplane.service"
else
    say "systemd is not PID 1 here: starting the unit's ExecStart myself${NODE_NS:+, inside namespace $NODE_NS}:"
    echo "   $exec_start"
    pid="$(cat "$PIDFILE" 2>/dev/null || true)"
    running=0
    if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ]; then
        # The console script runs under its interpreter: "<python> <ExecStart>".
        cmdline="$(tr '\0' ' ' < "/proc/$pid/cmdline" | sed 's/ $//')"
        case "$cmdline" in "$exec_start" | *" $exec_start") running=1 ;; esac
    fi
    if [ "$running" = 1 ] && [ "$changed" = 0 ]; then
        say "already running (pid $pid), nothing changed"
    else
        stop_pidfile
        # shellcheck disable=SC2086  # ExecStart is split on spaces, as systemd splits it
        if [ -n "$NODE_NS" ]; then
            setsid ip netns exec "$NODE_NS" $exec_start </dev/null >>"$LOG" 2>&1 &
        else
            setsid $exec_start </dev/null >>"$LOG" 2>&1 &
        fi
        echo $! > "$PIDFILE"  # setsid and `ip netns exec` exec: this is the daemon's pid
        say "started (pid $(cat "$PIDFILE")), log in $LOG"
    fi
fi

# ---- 6. healthy, and answering the demo Service -------------------------------------------------------
for _ in $(seq 150); do
    in_node curl -sf -o /dev/null http://127.0.0.1:10256/healthz && break
    sleep 0.2
done
if ! in_node curl -sf http://127.0.0.1:10256/healthz >/dev/null; then
    echo "provision.sh: dataplane is not healthy; its log ($LOG):" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
fi
say "dataplane is healthy: $(in_node curl -sf http://127.0.0.1:10256/healthz)"
say "curl http://$DEMO_SERVICE/ (Service nginx), 6 times:"
answered=0
for i in $(seq 6); do
    if body="$(in_client curl -sf --max-time 2 "http://$DEMO_SERVICE/")"; then
        echo "   request $i: answered by ${body%% *}"
        answered=$((answered + 1))
    else
        echo "   request $i: no answer"
    fi
done
if [ "$answered" -eq 0 ]; then
    echo "provision.sh: the demo Service does not answer" >&2
    exit 1
fi
say "done"
