"""Generated manifests (hypothesis, seeded and bounded): the parser never crashes or hangs, a good
Service next to them keeps its rules, and every invalid object is reported (issue 13).

The generator is the oracle: each field is drawn either valid or invalid, and the object records
what it injected: nothing (it must be used, with no problem), only problems it survives (a bad
annotation, an ignored field: used, and reported with `skipped` False), or a fatal one (it must
be left out and reported once, `skipped` True). An invalid object that is neither reported nor
refused is "unreported" and fails the run.

Runs: OBJECT_CASES examples of 1-4 objects through parse, store and render; TEXT_CASES mutated
YAML/JSON texts through the real parser process. `FUZZ_REPORT=path` writes the figures
(cases tried, crashes, unreported invalid objects) as JSON.

Address plan: see yamlcases.py; the good Service is 10.96.0.1:80, created 2000-01-01 (so it is
the oldest: any generated Service claiming its address and port loses, and must be reported).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from dataplane.config import NodeSettings
from dataplane.model import parse_objects
from dataplane.model.service import object_ref
from dataplane.nat import layout
from dataplane.nat.render import RulesetBuilder
from dataplane.sync.reader import Limits, ParserProcess, Refused
from dataplane.sync.store import Store

OBJECT_CASES = 10_000
TEXT_CASES = 1_500
SEED = 13
FIGURES: dict[str, int] = {"object_cases": 0, "objects": 0, "invalid_objects": 0, "unreported_invalid_objects": 0,
                           "crashes": 0, "text_cases": 0, "texts_refused": 0, "parser_restarts": 0}

GOOD = [
    {"apiVersion": "v1", "kind": "Service",
     "metadata": {"name": "good", "namespace": "shop", "creationTimestamp": "2000-01-01T00:00:00Z"},
     "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
     "metadata": {"name": "good-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "good"}},
     "ports": [{"name": "http", "port": 8080}], "endpoints": [{"addresses": ["10.244.1.5"]}]},
]
GOOD_KEY = "10.96.0.1 . tcp . 80"
SETTINGS = NodeSettings(node_name="node-1")

SKIP, KEPT = "skip", "kept"
INJECTIONS = ['web"; flush ruleset; "', "web;drop", "web}{", "web\nadd table ip evil", "Web", "-web", "a" * 64, ""]
SPECIAL = ["127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "169.254.1.1", "::1", "::", "ff02::1", "fe80::1"]
GARBAGE = ["10.96.0.300", "bogus", "10.96.0.1/32", "1.2.3", " 10.96.0.5", 42, True, [], {}]


class Case:
    """One generated object and what the generator put into it."""

    def __init__(self) -> None:
        self.injected: set[str] = set()

    def bad(self, what: str) -> None:
        self.injected.add(what)

    @property
    def expected(self) -> str:
        return SKIP if SKIP in self.injected else KEPT if KEPT in self.injected else "valid"


def choose(rng: random.Random, valid, invalid: list, case: Case, severity: str = SKIP, p_invalid: float = 0.08):
    """A valid value, or (now and then) an invalid one that the case records. `valid` is a value or a list."""
    if rng.random() < p_invalid:
        case.bad(severity)
        return rng.choice(invalid)
    return rng.choice(valid) if isinstance(valid, list) else valid


def services(rng: random.Random, index: int):
    case = Case()
    name = choose(rng, f"svc-{index}", [f"Svc{index}", f"svc-{index};x", f"-s{index}",
                                                                   f"s{index}." + "a" * 70, 1000 + index], case)
    meta = {"name": name, "namespace": "fuzz"}
    kind = rng.choice(["ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"])
    spec: dict = {"type": choose(rng, kind, ["Internal", "clusterip", 7], case)}
    claims_good = rng.random() < 0.05
    address = "10.96.0.1" if claims_good else f"10.96.{1 + index // 250}.{index % 250 + 1}"
    spec["clusterIP"] = choose(rng, ([address, address, "None"]),
                               SPECIAL + GARBAGE, case)
    if spec["clusterIP"] == "None" and spec["type"] in ("NodePort", "LoadBalancer"):
        case.bad(SKIP)  # a headless Service has no node ports
    ports = []
    for number in range(rng.randint(0, 3)):
        port = {"name": f"p{number}", "protocol": rng.choice(["TCP", "UDP"]),
                "port": 80 if claims_good and number == 0 else 1000 + number,
                "targetPort": rng.choice([8080, "http", 9000])}
        port["port"] = choose(rng, (port["port"]), [0, 70000, -1, "80", True, 80.5], case)
        port["protocol"] = choose(rng, (port["protocol"]), ["ICMP", "tcp", 6], case)
        port["name"] = choose(rng, (port["name"]), (INJECTIONS[:-1] + [5]), case)
        port["targetPort"] = choose(rng, (port["targetPort"]),
                                    ([0, 65536, "web--x", "toolongportname1", [80], False]), case)
        if kind in ("NodePort", "LoadBalancer") and spec["type"] == kind and rng.random() < 0.5:
            port["nodePort"] = 30000 + index * 4 + number
        elif rng.random() < 0.03 and spec["type"] == "ClusterIP":
            port["nodePort"] = 30000 + index * 4 + number
            case.bad(KEPT)  # only used with NodePort or LoadBalancer: ignored, and said so
        ports.append(port)
    if len(ports) > 1 and rng.random() < 0.05:
        ports[-1]["name"] = ports[0]["name"]
        if ports[0]["name"] == ports[-1]["name"]:
            case.bad(SKIP)  # a duplicate port name
    if ports or rng.random() < 0.5:
        spec["ports"] = choose(rng, [ports], [{"port": 80}, "80", 80], case, p_invalid=0.02)
    if rng.random() < 0.3:
        externals = [f"192.168.{1 + index // 250}.{index % 250 + 1}"]
        spec["externalIPs"] = choose(rng, [externals], [[s] for s in SPECIAL + GARBAGE[:5]], case)
    if rng.random() < 0.2:
        spec["sessionAffinity"] = choose(rng, "ClientIP", ["Sticky", "clientip"], case)
        if spec["sessionAffinity"] == "ClientIP":
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": choose(
                rng, [1, 30, 10800, 86400], [0, 86401, "30", -5], case)}}
    if rng.random() < 0.2 and kind != "ClusterIP":  # the API server allows it for external types only
        spec["externalTrafficPolicy"] = choose(rng, (["Cluster", "Local"]),
                                               (["Global", "local"]), case)
    annotations = {}
    if rng.random() < 0.2:
        annotations["dataplane.io/lb-algorithm"] = choose(rng, (["random", "maglev", "least-conn"]),
                                                          (["fastest", "Maglev", " rr"]), case, KEPT, 0.3)
    if rng.random() < 0.2:
        annotations["dataplane.io/weights"] = choose(rng, (["10.244.1.5=3", "node:n1=0, zone:a=2"]),
                                                     (["pod1=2", "10.244.1.5=1001", "node:=1"]),
                                                     case, KEPT, 0.3)
    if rng.random() < 0.03:
        annotations["dataplane.io/weight"] = "1"
        case.bad(KEPT)
    if annotations:
        meta["annotations"] = annotations
    if rng.random() < 0.5:
        meta["creationTimestamp"] = choose(rng, (["2024-05-01T10:00:00Z", "2010-01-01T00:00:00+02:00"]),
                                           (["yesterday", "2024-13-01T00:00:00Z", "2024-05-01"]),
                                           case, KEPT)
    if kind == "LoadBalancer" and spec["type"] == kind and rng.random() < 0.5:
        ingress = choose(rng, f"192.168.{100 + index // 250}.{index % 250 + 1}", SPECIAL,
                         case, KEPT)
        obj_status = {"loadBalancer": {"ingress": [{"ip": ingress}]}}
    else:
        obj_status = {}
    obj = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec, "status": obj_status}
    return obj, case


def slices(rng: random.Random, index: int):
    case = Case()
    family = rng.choice(["IPv4", "IPv4", "IPv6"])
    labels = {"kubernetes.io/service-name": f"svc-{rng.randint(0, 3)}"}
    if rng.random() < 0.05:
        labels = {}
        case.bad(SKIP)
    meta = {"name": choose(rng, f"slice-{index}", [f"Slice{index}", f"s{index};"], case),
            "namespace": "fuzz", "labels": labels}
    endpoints = []
    for number in range(rng.randint(0, 3)):
        address = f"10.244.{index % 200}.{number + 1}" if family == "IPv4" else f"fd00:10:244::{index:x}:{number + 1}"
        mismatched = f"fd00::{number + 1}" if family == "IPv4" else f"10.244.9.{number + 1}"
        if rng.random() < 0.03:
            addresses = []
            case.bad(KEPT)  # an endpoint without an address: left out, said so
        else:
            addresses = choose(rng, [[address]], [[mismatched], ["x"], [42]], case)
        endpoint = {"addresses": addresses,
                    "conditions": {"ready": choose(rng, [True, False], ["yes", 1], case)}}
        if rng.random() < 0.5:
            endpoint["nodeName"] = choose(rng, f"node-{number}", ["Node_1", "n;"], case)
        endpoints.append(endpoint)
    ports = [{"name": "p0", "port": choose(rng, [1, 80, 8080, 65535], [0, 65536, "x"], case),
              "protocol": choose(rng, (["TCP", "UDP"]), ["HTTP"], case)}]
    address_type = choose(rng, family, ["IPv5", "ipv4"], case)
    obj = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": address_type,
           "metadata": meta, "endpoints": endpoints, "ports": ports}
    return obj, case


@st.composite
def batches(draw):
    """1-4 objects; hypothesis draws the seed, the generators spend it (one draw per batch keeps 10,000 fast)."""
    rng = random.Random(draw(st.integers(0, 2**64)))
    return [(services if rng.random() < 0.5 else slices)(rng, i) for i in range(rng.randint(1, 4))]


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def figures():
    yield FIGURES
    if os.environ.get("FUZZ_REPORT"):
        Path(os.environ["FUZZ_REPORT"]).write_text(json.dumps(FIGURES, indent=1) + "\n")


def test_generated_objects_are_used_or_reported_and_the_good_service_keeps_its_rules(figures):
    builder = RulesetBuilder(SETTINGS)
    good, _ = parse_objects(GOOD, "good.yaml")

    @_settings(OBJECT_CASES)
    @given(batches())
    def check(batch):
        FIGURES["object_cases"] += 1
        objs = [obj for obj, _ in batch]
        try:
            objects, errors = parse_objects(objs, "fuzz.yaml")
            store = Store()
            store.replace("good.yaml", good)
            store.replace("fuzz.yaml", objects)
            ruleset = builder.build(store.snapshot())
        except Exception:
            FIGURES["crashes"] += 1
            raise
        problems = store.problems().get("fuzz.yaml", [])
        for obj, case in batch:
            FIGURES["objects"] += 1
            ref = object_ref(obj)
            mine = [e for e in errors if e.ref == ref and e.kind == obj["kind"]]
            derived = [p for p in problems if f" {obj['kind']} {ref}: " in p]
            used = [v for v in objects.services + objects.slices if f"{v.namespace}/{v.name}" == ref]
            if case.expected != "valid":
                FIGURES["invalid_objects"] += 1
                if not mine:
                    FIGURES["unreported_invalid_objects"] += 1
            if case.expected == SKIP:
                assert not used and [e.skipped for e in mine] == [True], (obj, mine)
            elif case.expected == KEPT:
                assert used and mine and not any(e.skipped for e in mine), (obj, mine)
            else:
                assert used and not mine, (obj, mine)
            claims_good = any(v.cluster_ips == ("10.96.0.1",) and any(p.port == 80 and p.protocol == "TCP"
                                                                      for p in v.ports)
                              for v in used if hasattr(v, "cluster_ips"))
            assert bool(derived) == claims_good, (obj, derived)
        # The good Service: its dispatch entry and endpoint, and nobody else's entry on its address:port.
        holders = {(owner, e.container) for owner, fragment in ruleset.fragments.items()
                   for e in fragment.elements if e.key == GOOD_KEY or e.key.startswith(GOOD_KEY + " . ")}
        owners = {owner for owner, _ in holders}
        assert len(owners) == 1 and str(next(iter(owners))) == "shop/good", holders
        assert (next(iter(owners)), layout.SERVICE_IPS) in holders

    check()
    assert FIGURES["crashes"] == 0 and FIGURES["unreported_invalid_objects"] == 0
    assert FIGURES["object_cases"] >= OBJECT_CASES


@st.composite
def texts(draw):
    """A manifest as text, then damaged: truncated, spliced, nested deep, aliased, retyped."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    obj, _ = services(rng, rng.randrange(500))
    text = json.dumps(obj) if rng.random() < 0.3 else _yaml(obj)
    suffix = ".json" if text.startswith("{") and rng.random() < 0.8 else ".yaml"
    damage = rng.choice((["none", "truncate", "splice", "nest-block", "nest-flow", "aliases", "bytes",
                                   "tabs", "documents"]))
    if damage == "truncate":
        text = text[: rng.randrange(len(text) + 1)]
    elif damage == "splice":
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(["{", "[", "]", ": ", "- ", "&a ", "*a", "!!binary ", "'", '"', "\n  ", "---\n",
                                       "%YAML 1.1\n", "? ", "\t", "|\n", "\x00"]) + text[at:]
    elif damage == "nest-block":
        text = "- " * rng.choice([50, 99, 101, 500, 5000, 60_000]) + "x\n"
    elif damage == "nest-flow":
        text = "a: " + "[" * rng.choice([10, 101, 1000, 100_000]) + "]" * rng.randrange(3)
        suffix = rng.choice([".yaml", ".json"])
    elif damage == "aliases":
        depth = rng.randrange(2, 10)
        text = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(depth))
    elif damage == "bytes":
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x2FF), 10])) for _ in
                       range(rng.randrange(200)))
    elif damage == "tabs":
        text = text.replace("  ", "\t")
    elif damage == "documents":
        text = "---\n".join([text] * rng.randrange(1, 5)) + "\n--- 42\n--- [1, 2]\n---\n"
    return text, suffix


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def test_damaged_texts_never_crash_or_hang_the_daemon_side(tmp_path, figures):
    parser = ParserProcess(tmp_path, Limits(timeout=10))
    started = parser.starts

    @_settings(TEXT_CASES)
    @given(texts())
    def check(case):
        text, suffix = case
        FIGURES["text_cases"] += 1
        path = tmp_path / f"case{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            ((read, documents),) = list(parser.read([path]))
            if isinstance(documents, Refused):
                FIGURES["texts_refused"] += 1
                assert str(documents).startswith(f"{path}: ") and "\n" not in str(documents)
                return
            objects, errors = parse_objects(documents, str(path))
            Store().replace(str(path), objects)
        except Exception:
            FIGURES["crashes"] += 1
            raise
        assert all(str(e).startswith(f"{path}: ") for e in errors)

    try:
        check()
    finally:
        FIGURES["parser_restarts"] += parser.starts - started
        parser.close()
    assert FIGURES["crashes"] == 0
