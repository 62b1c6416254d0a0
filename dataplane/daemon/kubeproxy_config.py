"""kube-proxy's inputs in kube-proxy's spelling: its config file, its durations, its bind addresses.

`load(path)` reads a `kubeproxy.config.k8s.io/v1alpha1` KubeProxyConfiguration
(YAML or JSON, as kubeadm writes `config.conf` into the `kube-proxy`
ConfigMap) and returns what it says as `FileConfig`: values keyed by the
`dataplane run` option they set (argparse dest names), plus the fields that
exist in kube-proxy's API but mean nothing here. Decoding is kube-proxy's:
its strict decoder refuses unknown fields and keys given twice, and then,
for v1alpha1, it decodes again leniently and only logs the strict error
(cmd/kube-proxy/app/options.go, loadConfig; kubernetes#84143, since 1.17).
So here an unknown field or a repeated key is noted in `FileConfig.lenient`
(the caller logs each as a warning) and the rest is used; a value of the
wrong type fails both of kube-proxy's decoders, and raises `ConfigError`
naming the file and the field path, with nothing half-applied.

Our own settings may follow in a second YAML document of the same file,
`apiVersion: dataplane.io/v1alpha1`, `kind: DataplaneConfiguration`:
kube-proxy's YAML decoder reads the first document only, so a file carrying
both still starts kube-proxy unchanged (the way back stays open).

The rules of precedence between this file and flags live in `resolve()`.
Pure: no I/O but reading the one file.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
EXTENSION_API_VERSION = "dataplane.io/v1alpha1"
EXTENSION_KIND = "DataplaneConfiguration"

HEALTHZ_PORT = 10256  # kube-proxy's ports.ProxyHealthzPort
METRICS_PORT = 10249  # kube-proxy's ports.ProxyStatusPort

KERNEL_MODES = ("", "iptables", "nftables")  # kube-proxy modes that mean our kernel mode
REFUSED_MODES = {
    "ipvs": "mode ipvs: IPVS is not implemented here; use nftables (or iptables), which dataplane serves in "
            "kernel mode",
    "kernelspace": "mode kernelspace is kube-proxy's Windows mode; dataplane runs on Linux only",
}
LOCAL_MODES = ("", "ClusterCIDR")  # detectLocalMode values implemented here


class ConfigError(ValueError):
    """A config file or flag value that cannot be used; the message names the file/flag and the field."""


# ---------------------------------------------------------------------------------------------------------
# Values as kube-proxy spells them.

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, *, bare_seconds: bool = False) -> float:
    """A Go duration ("30s", "1m30s", "24h0m0s", "250ms", "0") in seconds.

    `bare_seconds`: also accept a plain number of seconds ("1", "0.5"), the
    spelling our flags had before they took kube-proxy's. Raises ValueError.
    """
    text = text.strip()
    if bare_seconds:
        try:
            return _non_negative(float(text), text)
        except ValueError:
            pass
    if text in ("0", "+0", "-0"):
        return 0.0
    body = text[1:] if text[:1] in "+-" else text
    total, position = 0.0, 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if not body or position != len(body):
        raise ValueError(f"{text!r} is not a duration (like 30s, 1m30s, 250ms)")
    return _non_negative(-total if text.startswith("-") else total, text)


def _non_negative(seconds: float, text: str) -> float:
    if seconds < 0:
        raise ValueError(f"{text!r}: a negative duration")
    return seconds


def bind_address(text: str, default_port: int, what: str) -> str:
    """kube-proxy's IP:port spelling -> "HOST:PORT", or "" (server off).

    "1.2.3.4:10256", "[::1]:10249", a bare IP ("0.0.0.0", "::") that takes
    `default_port`, or "" to turn the server off. Raises ConfigError naming `what`.
    """
    text = text.strip()
    if not text:
        return ""
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigError(f"{what}: {text!r} is not IP, IP:port or [IPv6]:port")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ConfigError(f"{what}: {text!r} is not IP, IP:port or [IPv6]:port")
        port = int(port_text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what}: {host!r} in {text!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{what}: port {port} in {text!r} is out of range")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def feature_gates(text: str, what: str = "--feature-gates") -> dict[str, bool]:
    """"A=true,B=false" -> {"A": True, "B": False}; raises ConfigError."""
    gates: dict[str, bool] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or value.strip().lower() not in ("true", "false"):
            raise ConfigError(f"{what}: {part!r} is not NAME=true|false")
        gates[name.strip()] = value.strip().lower() == "true"
    return gates


def media_type(text: str, what: str) -> str:
    """clientConnection.contentType / --kube-api-content-type: a `type/subtype`, or "" (client-go's
    default, JSON); raises ConfigError.

    Any media type is accepted, as kube-proxy accepts it; the API source asks for and decodes JSON
    whatever is given (sync/kube.py: api_client says so in the log)."""
    if not text.strip():
        return text
    kind, slash, subtype = text.split(";")[0].strip().partition("/")
    if not (kind and slash and subtype) or any(c.isspace() for c in kind + subtype):
        raise ConfigError(f"{what}: {text!r} is not a media type (like application/json)")
    return text


# ---------------------------------------------------------------------------------------------------------
# The schema: every field of v1alpha1 KubeProxyConfiguration, its type, and where it goes here.


@dataclass(frozen=True, slots=True)
class Kind:
    """A field's JSON type: how it is checked, and how an error names what was wanted."""

    words: str
    check: Callable[[Any], Any]  # the decoded value; raises TypeError (wrong type) or ValueError (bad text)


def _typed(*types: type, convert: Callable[[Any], Any] = lambda v: v) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        # bool is an int in Python; in JSON it is not.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise TypeError
        return convert(value)
    return check


def _duration(value: Any) -> float:
    if not isinstance(value, str):  # metav1.Duration is a string in JSON: 30 (a number) is refused
        raise TypeError
    return parse_duration(value)


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError
    return list(value)


def _bools(value: Any) -> dict[str, bool]:
    if not isinstance(value, dict) or not all(isinstance(v, bool) for v in value.values()):
        raise TypeError
    return {str(k): v for k, v in value.items()}


KINDS = {
    "str": Kind("a string", _typed(str)),
    "bool": Kind("true or false", _typed(bool)),
    "int": Kind("an integer", _typed(int)),
    "number": Kind("a number", _typed(int, float, convert=float)),
    "duration": Kind("a duration string like \"30s\"", _duration),
    "strings": Kind("a list of strings", _strings),
    "bools": Kind("a map of names to true/false", _bools),
    "any": Kind("a value", lambda v: v),
}


@dataclass(frozen=True, slots=True)
class Leaf:
    kind: str  # a key of KINDS
    pointer: bool = False  # a pointer in kube-proxy's Go type: its zero value is a value, only null is unset
    dest: str | None = None  # the `dataplane run` option it sets; None with `ignored`
    ignored: str = ""  # why it means nothing here (logged once when set)


def _leaf(kind: str, dest: str | None = None, pointer: bool = False) -> Leaf:
    return Leaf(kind, pointer, dest)


def _ignored_section(why: str, **kinds: str) -> dict[str, Leaf]:
    """A section none of whose fields means anything here."""
    return {name: Leaf(kind, ignored=why) for name, kind in kinds.items()}


# Why a setting means nothing here; shared with cli.IGNORED_FLAGS, whose flags are these fields' twins.
IPVS = "an IPVS setting; IPVS is not implemented here"
LOCALHOST_NODEPORTS = "NodePorts never answer on loopback here"
NO_PPROF = "no /debug/pprof here"
NO_HIDDEN_METRICS = "no metric is hidden here"
VMODULE = "per-module verbosity is klog's"
UNBUFFERED = "logs are written unbuffered"
_WINDOWS = "a Windows (winkernel) setting"
# The mode's own section (iptables or nftables) gives masqueradeAll, masqueradeBit and the
# sync periods, as kube-proxy's conversion does; the other section is ignored.
_SECTION_FIELDS = {
    "masqueradeAll": _leaf("bool", "masquerade_all"),
    "masqueradeBit": _leaf("int", "masquerade_bit", pointer=True),
    "syncPeriod": _leaf("duration", "sync_period"),
    "minSyncPeriod": _leaf("duration", "min_sync_period"),
}

SCHEMA: dict[str, Any] = {
    "apiVersion": _leaf("str"),
    "kind": _leaf("str"),
    "featureGates": _leaf("bools", "feature_gates"),
    "clientConnection": {
        "kubeconfig": _leaf("str", "kubeconfig"),
        **_ignored_section("the API client asks for JSON, the one format it decodes", acceptContentTypes="str"),
        "contentType": _leaf("str", "kube_api_content_type"),
        "qps": _leaf("number", "kube_api_qps"),
        "burst": _leaf("int", "kube_api_burst"),
    },
    "logging": {
        "format": _leaf("str", "logging_format"),
        "verbosity": _leaf("int", "v"),
        **_ignored_section(UNBUFFERED, flushFrequency="any", options="any"),
        **_ignored_section(VMODULE, vmodule="any"),
    },
    "hostnameOverride": _leaf("str", "hostname_override"),
    "bindAddress": _leaf("str", "bind_address"),
    "healthzBindAddress": _leaf("str", "healthz_bind_address"),
    "metricsBindAddress": _leaf("str", "metrics_bind_address"),
    "bindAddressHardFail": _leaf("bool", "bind_address_hard_fail"),
    **_ignored_section(NO_PPROF, enableProfiling="bool"),
    **_ignored_section(NO_HIDDEN_METRICS, showHiddenMetricsForVersion="str"),
    "mode": _leaf("str"),  # read by parse(): it picks kernel mode or refuses, and the section to read
    "iptables": {
        **_SECTION_FIELDS,
        **_ignored_section(LOCALHOST_NODEPORTS, localhostNodePorts="bool"),
        **_ignored_section("masquerading uses the egress address here", snatNodeInternalIP="bool"),
    },
    "nftables": dict(_SECTION_FIELDS),
    "ipvs": _ignored_section(IPVS, syncPeriod="duration", minSyncPeriod="duration", scheduler="str",
                             excludeCIDRs="strings", strictARP="bool", tcpTimeout="duration",
                             tcpFinTimeout="duration", udpTimeout="duration"),
    "winkernel": _ignored_section(_WINDOWS, networkName="str", sourceVip="str", enableDSR="bool",
                                  rootHnsEndpointName="str", forwardHealthCheckVip="bool"),
    "detectLocalMode": _leaf("str", "detect_local_mode"),
    "detectLocal": {
        "bridgeInterface": _leaf("str", "pod_bridge_interface"),
        "interfaceNamePrefix": _leaf("str", "pod_interface_name_prefix"),
    },
    "clusterCIDR": _leaf("str", "cluster_cidr"),
    "nodePortAddresses": _leaf("strings", "nodeport_addresses"),
    "oomScoreAdj": _leaf("int", "oom_score_adj", pointer=True),
    "conntrack": {
        "maxPerCore": _leaf("int", "conntrack_max_per_core", pointer=True),
        "min": _leaf("int", "conntrack_min", pointer=True),
        "tcpEstablishedTimeout": _leaf("duration", "conntrack_tcp_timeout_established", pointer=True),
        "tcpCloseWaitTimeout": _leaf("duration", "conntrack_tcp_timeout_close_wait", pointer=True),
        "tcpBeLiberal": _leaf("bool", "conntrack_tcp_be_liberal"),
        "udpTimeout": _leaf("duration", "conntrack_udp_timeout"),
        "udpStreamTimeout": _leaf("duration", "conntrack_udp_timeout_stream"),
    },
    "configSyncPeriod": _leaf("duration", "config_sync_period"),
    **_ignored_section("the userspace proxy it configured is gone from kube-proxy too", portRange="str"),
    **_ignored_section(_WINDOWS, windowsRunAsService="bool"),
}

# Fields older kubeadm releases wrote that kube-proxy has since removed: ignored with a reason of
# their own (kube-proxy's lenient decoding drops them as unknown).
REMOVED = {
    ("udpIdleTimeout",): "removed from kube-proxy with its userspace mode",
    ("resourceContainer",): "removed from kube-proxy",
    ("conntrack", "max"): "removed from kube-proxy (maxPerCore and min remain)",
}

EXTENSION_SCHEMA: dict[str, Any] = {
    "apiVersion": _leaf("str"),
    "kind": _leaf("str"),
    "source": _leaf("str", "source"),
    "proxyMode": _leaf("str", "proxy_mode"),
    "queues": _leaf("int", "queues"),
    "lbAlgorithm": _leaf("str", "lb_algorithm"),
    "nodeZone": _leaf("str", "node_zone"),
    "serviceCIDR": _leaf("str", "service_cidr"),
    "dns": {
        "bindAddress": _leaf("str", "dns_bind_address"),
        "clusterDomain": _leaf("str", "cluster_domain"),
        "upstream": _leaf("strings", "dns_upstream"),
        "ttl": _leaf("int", "dns_ttl"),
    },
}


@dataclass
class FileConfig:
    """What a config file says: option values by dest, and the set-but-meaningless fields."""

    path: str
    values: dict[str, Any] = field(default_factory=dict)  # kube-proxy's fields, by dest, decoded
    extension: dict[str, Any] = field(default_factory=dict)  # our DataplaneConfiguration's, by dest
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (field path, why)
    # What kube-proxy's strict decoder refuses and its lenient one then lets pass: unknown fields
    # (dropped) and keys given twice (the last wins). Logged as warnings, one a field.
    lenient: list[str] = field(default_factory=list)
    mode: str = ""


def load(path: str | Path) -> FileConfig:
    """Reads and decodes a KubeProxyConfiguration file as kube-proxy does; raises ConfigError naming the field."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror or error}") from None
    return parse(text, path)


def parse(text: str, path: str = "<config>") -> FileConfig:
    found = FileConfig(path)
    documents = _documents(text, path, found.lenient)
    if not documents:
        raise ConfigError(f"{path}: empty; want a {KIND}")
    first, *rest = documents
    _expect_kind(first, path, API_VERSION, KIND)
    mode = first.get("mode") or ""
    if not isinstance(mode, str):
        raise ConfigError(f"{path}: mode: want a string, got {_describe(mode)}")
    found.mode = mode
    if mode in REFUSED_MODES:
        raise ConfigError(f"{path}: {REFUSED_MODES[mode]}")
    if mode not in KERNEL_MODES:
        raise ConfigError(f"{path}: mode: {mode!r} is not a kube-proxy mode (iptables, nftables, ipvs, kernelspace)")
    # kube-proxy takes the mode's own section; "" and iptables mean the iptables section.
    unused_section = "iptables" if mode == "nftables" else "nftables"
    _walk(first, SCHEMA, (), found, found.values, unused_section)
    _ipv6_server_defaults(found.values)
    for document in rest:
        _expect_kind(document, path, EXTENSION_API_VERSION, EXTENSION_KIND)
        _walk(document, EXTENSION_SCHEMA, (), found, found.extension, None)
    return found


def _ipv6_server_defaults(values: dict[str, Any]) -> None:
    """kube-proxy's defaulting of the file: with an IPv6 bindAddress, the healthz and metrics servers
    left unset default to [::]:10256 and [::1]:10249 instead of their IPv4 addresses. An IPv4-mapped
    address (::ffff:a.b.c.d) counts as IPv4 there (Go's To4)."""
    try:
        address = ipaddress.ip_address(str(values.get("bind_address", "")).strip())
    except ValueError:
        return
    ipv6 = address.version == 6 and address.ipv4_mapped is None
    if ipv6:
        values.setdefault("healthz_bind_address", f"[::]:{HEALTHZ_PORT}")
        values.setdefault("metrics_bind_address", f"[::1]:{METRICS_PORT}")


def _documents(text: str, path: str, lenient: list[str]) -> list[dict]:
    def unique(pairs: list[tuple[Any, Any]], lines: list[int] | None = None) -> dict:
        mapping: dict = {}
        for index, (key, value) in enumerate(pairs):
            if key in mapping:
                where = f" (line {lines[index]})" if lines else ""
                lenient.append(f"field {key!r} is given twice{where}; the last one is used")
            mapping[key] = value
        return mapping

    try:
        if text.lstrip().startswith("{"):
            loaded = [json.loads(text, object_pairs_hook=unique)]
        else:
            loader = _PairsLoader(text)
            loader.unique = unique
            try:
                loaded = []
                while loader.check_data():
                    document = loader.get_data()
                    if document is not None:
                        loaded.append(document)
            finally:
                loader.dispose()
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not YAML or JSON: {error}") from None
    for index, document in enumerate(loaded):
        if not isinstance(document, dict):
            raise ConfigError(f"{path}: document {index + 1} is {_describe(document)}, not a mapping")
    return loaded


def _expect_kind(document: dict, path: str, api_version: str, kind: str) -> None:
    got = (document.get("apiVersion"), document.get("kind"))
    if got != (api_version, kind):
        raise ConfigError(f"{path}: apiVersion/kind is {got[0]!r}/{got[1]!r}; want {api_version}/{kind}"
                          + ("" if kind == KIND else " (our own settings, in a document after the first)"))


def _walk(obj: dict, schema: dict, prefix: tuple[str, ...], found: FileConfig,
          into: dict[str, Any], unused_section: str | None) -> None:
    for key, value in obj.items():
        here = (*prefix, str(key))
        name = ".".join(here)
        if here in REMOVED:
            if not _is_zero(value):
                found.ignored.append((name, REMOVED[here]))
            continue
        if key not in schema:
            found.lenient.append(f"{name}: unknown field" + _near(str(key), schema))
            continue
        spec = schema[key]
        if isinstance(spec, dict):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{found.path}: {name}: want a mapping, got {_describe(value)}")
            section_unused = prefix == () and key == unused_section
            _walk(value, spec, here, found, into if not section_unused else {}, None)
            if section_unused and not _is_zero(value):
                found.ignored.append((name, f"the {found.mode or 'iptables'} mode reads its own section"))
            continue
        decoded = _decode(spec, value, f"{found.path}: {name}")
        if spec.ignored:
            if not _is_zero(value):
                found.ignored.append((name, spec.ignored))
        elif spec.dest is not None and not _defaulted(spec, decoded):
            into[spec.dest] = ",".join(decoded) if spec.kind == "strings" else decoded


def _defaulted(spec: Leaf, decoded: Any) -> bool:
    """kube-proxy's defaulting: null (Go leaves the field unset) means the default; so does the zero
    value of a field that is not a pointer ("syncPeriod: 0s", "healthzBindAddress: \"\"", as kubeadm
    writes them), and an empty list or map."""
    if decoded is None or (spec.kind in ("strings", "bools") and not decoded):
        return True
    return not spec.pointer and _is_zero(decoded)


def _decode(spec: Leaf, value: Any, where: str) -> Any:
    if value is None:  # Go's decoder leaves a field it reads null from as it was
        return None
    kind = KINDS[spec.kind]
    try:
        return kind.check(value)
    except (TypeError, ValueError) as error:
        detail = f" ({error})" if isinstance(error, ValueError) and str(error) else ""
        raise ConfigError(f"{where}: want {kind.words}, got {_describe(value)}{detail}") from None


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)
    shown = json.dumps(value, default=str)
    return f"{kind} {shown[:40]}" if not isinstance(value, (dict, list)) else kind


def _is_zero(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_is_zero(v) for v in value.values())
    return value is None or value is False or value in ("", 0, [], "0s", "0")


def _near(key: str, schema: dict) -> str:
    lowered = {k.lower(): k for k in schema}
    if key.lower() in lowered:
        return f" (did you mean {lowered[key.lower()]}?)"
    return ""


class _PairsLoader(yaml.SafeLoader):
    """SafeLoader that hands each mapping's pairs to `unique`, which notes a key given twice."""

    unique: Callable[..., dict]


def _construct_mapping(loader: _PairsLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    pairs = [(loader.construct_object(k, deep=deep), loader.construct_object(v, deep=deep)) for k, v in node.value]
    return loader.unique(pairs, [k.start_mark.line + 1 for k, _ in node.value])


_PairsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


# ---------------------------------------------------------------------------------------------------------
# Precedence.

# kube-proxy (cmd/kube-proxy/app/options.go, Complete()): with --config the file replaces the whole
# configuration built from flags, except that logging flags given on the command line (-v,
# --logging-format) and --hostname-override still win. --master, --cleanup and --config are not
# configuration fields and always apply.
FLAGS_OVER_FILE = frozenset({"v", "logging_format", "hostname_override"})


@dataclass(frozen=True, slots=True)
class Resolution:
    values: dict[str, Any]  # dest -> value to set on the parsed arguments
    overridden: tuple[str, ...]  # kube-proxy flags given on the command line but replaced by the file


def resolve(config: FileConfig, given: set[str], kube_proxy_defaults: dict[str, Any],
            flag_values: dict[str, Any] | None = None) -> Resolution:
    """The option values that hold with `--config`, by kube-proxy's precedence.

    `given`: dests set explicitly on the command line. `kube_proxy_defaults`:
    dest -> default of each flag kube-proxy also has. Such a flag is replaced
    by the file's value, or by its default where the file leaves the field
    unset, except `FLAGS_OVER_FILE` (`flag_values`: what those flags were
    given as). Our own flags, when given, win over the extension document
    (kube-proxy has no word on them; a flag beats a file).
    """
    values: dict[str, Any] = {}
    overridden = []
    flag_values = flag_values or {}
    for dest, default in kube_proxy_defaults.items():
        if dest in FLAGS_OVER_FILE:
            # kube-proxy: a --hostname-override that is empty leaves the file's hostnameOverride (one of
            # blanks only replaces it, and is then refused: cli.check_kube_proxy_flags)
            spelled = dest in given and (dest != "hostname_override" or str(flag_values.get(dest, "")))
            if dest in config.values and not spelled:
                values[dest] = config.values[dest]
            continue
        values[dest] = config.values.get(dest, default)
        if dest in given:
            overridden.append(dest)
    for dest, value in config.extension.items():
        if dest not in given:
            values[dest] = value
    return Resolution(values, tuple(sorted(overridden)))
