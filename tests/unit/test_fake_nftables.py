"""The in-memory nftables (nat/fake/) and its tracer (nat/trace.py): tests of the test helpers.

The fake must refuse what the kernel refuses, apply a transaction whole or
not at all, and end in the same state whether it got there by one full
transaction or by many incremental ones. The tracer must follow nft's
verdict semantics exactly, or the packet-flow table checks nothing.

Address plan: Pods 10.244.0.0/16, ClusterIPs 10.96.0.0/12, node 192.168.50.1;
the hand-written tables use 10.0.0.0/24 for endpoints and 1.1.1.0/24 for
destinations.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dataplane.config import NodeSettings
from dataplane.daemon.proxier import Proxier
from dataplane.model import parse_objects
from dataplane.nat import plan
from dataplane.nat.fake import FakeNftables
from dataplane.nat.nftables import NftError
from dataplane.nat.render import RulesetBuilder, render
from dataplane.nat.trace import DNAT, DROP, REJECT, Outcome, Packet, TraceError, Tracer
from dataplane.sync.store import Store
from tests.flows import CLUSTER_CIDR, MANIFESTS, NODE_IP, NODE_NAME, NODE_ZONE, SERVICE_CIDR, cip

GOLDEN = Path(__file__).parent.parent / "golden"
SETTINGS = NodeSettings(node_name=NODE_NAME, cluster_cidrs=(CLUSTER_CIDR, "fd00:10:244::/48"),
                        service_cidrs=(SERVICE_CIDR,), node_zone=NODE_ZONE)
NODE_IPS = (NODE_IP, "10.244.1.1")

BASE = """\
add table ip t
add chain ip t pre { type nat hook prerouting priority -100 ; policy accept ; }
add chain ip t post { type nat hook postrouting priority 100 ; policy accept ; }
add chain ip t filter { type filter hook prerouting priority -110 ; policy accept ; }
add chain ip t c
add set ip t s { type ipv4_addr ; }
add map ip t m { type ipv4_addr . inet_proto . inet_service : verdict ; }
add rule ip t pre ip daddr . meta l4proto . th dport vmap @m
add rule ip t c meta l4proto tcp dnat ip to 10.0.0.1:80
add element ip t m { 10.96.0.1 . tcp . 80 : goto c }
"""


def loaded(script: str = BASE) -> FakeNftables:
    nft = FakeNftables()
    nft.run(script)
    return nft


# --- the fake as a stand-in for Nftables -------------------------------------------------------


@pytest.mark.parametrize("golden", sorted(p.name for p in GOLDEN.glob("*.nft")))
def test_golden_rulesets_load(golden: str) -> None:
    nft = loaded((GOLDEN / golden).read_text())
    assert nft.dump().startswith("table ip dataplane {\n")
    assert ("chain", "services") in nft.list_objects("ip", "dataplane")


def test_dump_is_sorted_whatever_order_elements_arrive_in() -> None:
    one = loaded(BASE + "add element ip t s { 10.0.0.9, 10.0.0.10, 9.0.0.1 }\n")
    other = loaded(BASE + "add element ip t s { 10.0.0.10 }\nadd element ip t s { 9.0.0.1, 10.0.0.9 }\n")
    assert one.dump() == other.dump()
    assert "\t\t\t9.0.0.1\n\t\t\t10.0.0.9\n\t\t\t10.0.0.10\n" in one.dump()  # by address, not text


def test_list_objects_and_idempotent_delete_table() -> None:
    nft = loaded()
    assert sorted(nft.list_objects("ip", "t")) == [
        ("chain", "c"), ("chain", "filter"), ("chain", "post"), ("chain", "pre"), ("map", "m"), ("set", "s")]
    assert nft.list_objects("ip6", "t") == []
    nft.delete_table("ip", "t")
    nft.delete_table("ip", "t")
    assert nft.dump() == ""


def test_adding_what_exists_alike_changes_nothing() -> None:
    nft = loaded()
    before = nft.dump()
    nft.run("".join(line + "\n" for line in BASE.splitlines() if not line.startswith("add rule")))
    assert nft.dump() == before  # (a rule added again is a second rule, in the kernel too)


def test_list_commands_print_without_changing_anything() -> None:
    nft = loaded()
    assert nft.run("list tables") == "table ip t\n"
    assert nft.run("list table ip t") == nft.dump()
    with pytest.raises(NftError) as raised:
        nft.run("list table ip missing")
    assert raised.value.is_not_found()


# --- atomicity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", [
    "delete element ip t s { 10.9.9.9 }",  # a missing object, last in the batch
    "add rule ip t filter jump c",  # refused only by the final validation (dnat reached from filter)
    "add rule ip t c frobnicate",  # a syntax error: nothing is even tried
], ids=["missing-element", "validation", "syntax"])
def test_a_failing_transaction_changes_nothing(failing: str) -> None:
    nft = loaded()
    before, applied = nft.dump(), list(nft.applied)
    script = ("delete table ip t\nadd table ip t\nadd set ip t fresh { type ipv4_addr ; }\n"
              "add element ip t fresh { 10.1.1.1 }\n") if failing.startswith("delete") else ""
    script = BASE + "add element ip t s { 10.0.0.1 }\nflush map ip t m\n" + script + failing + "\n"
    with pytest.raises(NftError):
        nft.run(script)
    assert nft.dump() == before and nft.applied == applied


def test_check_only_validates_without_applying() -> None:
    nft = loaded()
    before = nft.dump()
    nft.run("add element ip t s { 10.0.0.1 }", check_only=True)
    with pytest.raises(NftError):
        nft.run("delete element ip t s { 10.0.0.1 }", check_only=True)
    assert nft.dump() == before


def test_earlier_commands_are_seen_by_later_ones_in_one_batch() -> None:
    nft = loaded()
    nft.run("delete element ip t m { 10.96.0.1 . tcp . 80 }\ndelete chain ip t c\n"
            "add chain ip t c\nadd element ip t s { 10.0.0.1 }\ndelete element ip t s { 10.0.0.1 }\n")
    assert nft.elements("ip", "t", "m") == {} and nft.rules("ip", "t", "c") == []


# --- what the kernel refuses ---------------------------------------------------------------------

LOOP = "add chain ip t a\nadd chain ip t b\nadd rule ip t a jump b\nadd rule ip t b jump a\nadd rule ip t pre jump a"
DEEP = "".join(f"add chain ip t j{i}\n" for i in range(17)) + "".join(
    f"add rule ip t j{i} jump j{i + 1}\n" for i in range(15)) + "add rule ip t filter jump j0"
REFUSED = [
    ("missing-table", "delete table ip nothere", errno.ENOENT, "No such file"),
    ("missing-element", "delete element ip t s { 1.2.3.4 }", errno.ENOENT, "1.2.3.4"),
    ("jump-to-missing-chain", "add rule ip t c jump nowhere", errno.ENOENT, "nowhere"),
    ("lookup-in-missing-set", "add rule ip t c ip saddr @nothere drop", errno.ENOENT, "@nothere"),
    ("key-claimed-with-another-value", "add element ip t m { 10.96.0.1 . tcp . 80 : drop }", errno.EEXIST,
     "goto c"),
    ("set-redeclared-with-another-shape", "add set ip t s { type ipv4_addr ; flags interval ; }", errno.EEXIST,
     "exists as"),
    ("timeout-added-to-a-set", "add set ip t s { type ipv4_addr ; timeout 10s ; }", errno.EEXIST, "exists as"),
    ("regular-chain-made-base", "add chain ip t c { type filter hook input priority 0 ; }", errno.EEXIST, "c"),
    ("chain-still-in-a-verdict-map", "delete chain ip t c", errno.EBUSY, "used by map m"),
    ("chain-in-a-map-after-flush-table", "flush table ip t\ndelete chain ip t c", errno.EBUSY, "map m"),
    ("map-still-looked-up", "delete map ip t m", errno.EBUSY, "used by chain pre"),
    ("overlapping-intervals", ("add set ip t i { type ipv4_addr ; flags interval ; }\n"
      "add element ip t i { 10.0.0.0/8, 10.1.0.0/16 }"), errno.EEXIST, "overlaps"),
    ("dnat-reached-from-a-filter-chain", "add rule ip t filter jump c", errno.EOPNOTSUPP, "Operation not supported"),
    ("dnat-reached-through-a-verdict-map", ("add map ip t fm { type ipv4_addr : verdict ; }\n"
      "add rule ip t filter ip daddr vmap @fm\nadd element ip t fm { 1.1.1.1 : goto c }"), errno.EOPNOTSUPP,
     "Operation not supported"),
    ("masquerade-in-prerouting", "add rule ip t pre masquerade", errno.EOPNOTSUPP, "Operation not supported"),
    ("reject-in-postrouting", "add chain ip t r\nadd rule ip t r reject\nadd rule ip t post jump r",
     errno.EOPNOTSUPP, "Operation not supported"),
    ("jump-to-a-base-chain", "add rule ip t c jump pre", errno.EOPNOTSUPP, "Operation not supported"),
    ("jump-loop", LOOP, None, "Too many links"),
    ("sixteen-levels-of-jumps", DEEP, None, "Too many links"),
    ("lookup-with-another-key-type", "add rule ip t c ip daddr . th dport vmap @m", None, "datatype mismatch"),
    ("port-mapping-without-protocol-match", "add rule ip t c dnat ip to 10.0.0.1:80", None,
     "transport protocol mapping"),
    ("mapped-port-without-protocol-match", ("add map ip t e { typeof ip daddr : ip daddr . th dport ; }\n"
      "add rule ip t c dnat ip to ip daddr map @e"), None, "transport protocol mapping"),
    ("range-in-a-plain-set", "add element ip t s { 10.0.0.0/8 }", None, "flags interval"),
    ("element-timeout-without-timeout-flag", "add element ip t s { 1.2.3.4 timeout 10s }", errno.EOPNOTSUPP,
     "timeout"),
    ("address-of-the-other-family", "add element ip t s { fd00::1 }", None, "datatype mismatch"),
]
ACCEPTED = [
    ("same-element-again", "add element ip t m { 10.96.0.1 . tcp . 80 : goto c }"),
    ("update-of-a-dynamic-set", ("add set ip t d { type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }\n"
                                 "add rule ip t c update @d { ip saddr }")),
    ("disjoint-concatenated-intervals", ("add set ip t i { type ipv4_addr . ipv4_addr ; flags interval ; }\n"
                                         "add element ip t i { 1.1.1.1 . 10.0.0.0/8, 1.1.1.2 . 10.0.0.0/8 }")),
    ("base-chain-deleted-with-its-rules", "delete chain ip t pre"),
    ("flushed-chain-frees-its-map", "flush chain ip t pre\ndelete map ip t m"),
    ("emptied-map-frees-its-chain", "delete element ip t m { 10.96.0.1 . tcp . 80 }\ndelete chain ip t c"),
    ("fifteen-levels-of-jumps", DEEP.replace("add rule ip t j14 jump j15\n", "")),
    ("reject-in-nat-prerouting", "add rule ip t pre reject"),
]


@pytest.mark.parametrize("name, script, code, fragment", REFUSED, ids=[r[0] for r in REFUSED])
def test_the_fake_refuses_what_the_kernel_refuses(name: str, script: str, code: int | None, fragment: str) -> None:
    nft = loaded()
    with pytest.raises(NftError) as raised:
        nft.run(script)
    assert fragment in str(raised.value)
    if code is not None:
        assert raised.value.errno == code
    assert raised.value.is_not_found() == (code == errno.ENOENT)


@pytest.mark.parametrize("name, script", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_the_fake_accepts_what_the_kernel_accepts(name: str, script: str) -> None:
    loaded().run(script)


def _kernel_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("nft") or not shutil.which("unshare"):
        return "needs nft and unshare"
    return None


@pytest.mark.netns
@pytest.mark.skipif(_kernel_available() is not None, reason=f"kernel comparison: {_kernel_available()}")
def test_the_kernel_agrees_with_the_fake_on_every_case() -> None:
    """The REFUSED and ACCEPTED cases, each in a fresh network namespace: the fake's verdicts are the kernel's."""
    disagree = []
    for name, script, *_ in REFUSED + ACCEPTED:
        done = subprocess.run(["unshare", "-n", "nft", "-f", "-"], input=BASE + "\n" + script + "\n",
                              capture_output=True, text=True, check=False)
        # BASE and the case in one batch: the fake must agree on that too.
        try:
            loaded(BASE + script + "\n")
            fake_ok = True
        except NftError:
            fake_ok = False
        if (done.returncode == 0) != fake_ok:
            disagree.append(f"{name}: kernel {'accepts' if done.returncode == 0 else 'refuses'} ({done.stderr})")
    assert disagree == []


# --- parser errors name the line -----------------------------------------------------------------

SYNTAX = [
    ("unknown-statement", "add table ip t\nadd chain ip t c\nadd rule ip t c frobnicate 1\n", 3, "frobnicate"),
    ("unknown-command", "add table ip t\ninsert rule ip t c drop\n", 2, "insert"),
    ("brace-never-closed", "add table ip t\nadd set ip t s { type ipv4_addr ;\nadd set ip t x { type mark ; }\n", 2,
     "never closed"),
    ("unterminated-comment", ('add table ip t\nadd map ip t m { type mark : verdict ; }\n'
      'add element ip t m { 1 comment "oops : drop }\n'), 3, "unterminated string"),
    ("map-without-data-type", "add table ip t\nadd map ip t m { type ipv4_addr ; }\n", 2, "data type"),
    ("unknown-type", "add table ip t\nadd set ip t s { type ether_addr ; }\n", 2, "ether_addr"),
    ("bad-address-in-a-rule", "add table ip t\nadd chain ip t c\nadd rule ip t c ip saddr 10.0.0.300 drop\n", 3,
     "10.0.0.300"),
    ("statement-after-a-verdict", "add table ip t\nadd chain ip t c\nadd rule ip t c drop accept\n", 3, "accept"),
    ("ip6-field-in-an-ip-table", "add table ip t\nadd chain ip t c\nadd rule ip t c ip6 saddr fd00::1 drop\n", 3,
     "ip6 saddr"),
    ("bad-element-in-a-block", ("add table ip t\nadd set ip t s { type ipv4_addr . inet_service ; }\n"
      "add element ip t s {\n\t10.0.0.1 . 80,\n\t10.0.0.2 . http\n}\n"), 5, "http"),
    ("key-with-a-part-missing", ("add table ip t\nadd set ip t s { type ipv4_addr . inet_service ; }\n"
      "add element ip t s {\n\t10.0.0.1 . 80,\n\t10.0.0.2\n}\n"), 5, "has 1 part,"),
]


@pytest.mark.parametrize("name, script, line, fragment", SYNTAX, ids=[s[0] for s in SYNTAX])
def test_errors_name_the_line(name: str, script: str, line: int, fragment: str) -> None:
    nft = FakeNftables()
    with pytest.raises(NftError) as raised:
        nft.run(script)
    message = str(raised.value)
    assert message.startswith(f"/dev/stdin:{line}:"), message
    assert fragment in message
    assert nft.dump() == ""


# --- incremental transactions converge to a full one ---------------------------------------------


def _documents(changes: dict[str, Callable[[list[dict]], None] | None]) -> dict[str, list[dict]]:
    """MANIFESTS with some files changed in place (by file stem), or removed (None)."""
    manifests = copy.deepcopy(MANIFESTS)
    for stem, change in changes.items():
        name = f"{stem}.yaml"
        if change is None:
            del manifests[name]
        else:
            change(manifests[name])
    return manifests


def _keep_endpoints(count: int):
    def change(documents: list[dict]) -> None:
        documents[1]["endpoints"] = documents[1]["endpoints"][:count]
    return change


def _spec(**fields):
    def change(documents: list[dict]) -> None:
        documents[0]["spec"].update(fields)
    return change


def _without_slice(documents: list[dict]) -> None:
    del documents[1:]


STEPS = [
    ("sticky-to-three-endpoints", {"sticky": _keep_endpoints(3)}),
    ("all-to-two-endpoints", {"all": _keep_endpoints(2)}),
    ("etp-local-to-cluster", {"etp-local": _spec(externalTrafficPolicy="Cluster")}),
    ("sticky-loses-affinity", {"sticky": _spec(sessionAffinity="None")}),
    ("itp-none-slice-deleted", {"itp-none": _without_slice}),
    ("none-removed", {"none": None}),
    ("ranges-change", {"ranges": _spec(loadBalancerSourceRanges=["192.168.0.0/16", "10.1.0.0/16"])}),
    ("self-gains-endpoints", {"self": lambda docs: docs[1].update(endpoints=MANIFESTS["all.yaml"][1]["endpoints"])}),
]


class _Node:
    """A store with its incremental builder and programmed state, and one fake per way of syncing."""

    def __init__(self) -> None:
        self.store = Store()
        self.builder = RulesetBuilder(SETTINGS)
        self.state = plan.Programmed()
        self.incremental = FakeNftables()  # every sync incremental (the first is full)
        self.in_place = FakeNftables()  # every sync a full one, flushed and refilled in place

    def sync(self, manifests: dict[str, list[dict]], node_ips: tuple[str, ...] = NODE_IPS, step: str = "") -> str:
        for origin in self.store.origins - manifests.keys():
            self.store.replace(origin, None)
        for origin, documents in manifests.items():
            objects, errors = parse_objects(copy.deepcopy(documents), origin)
            assert not errors, errors
            self.store.replace(origin, objects)
        snapshot = self.store.snapshot()
        ruleset = self.builder.build(snapshot, node_ips)
        transaction, change = self.state.plan(ruleset)
        self.incremental.apply(transaction)
        self.state = self.state.commit(change)
        in_place, _ = plan.full(ruleset, self.in_place.list_objects("ip", "dataplane"))
        self.in_place.apply(in_place)
        reference = FakeNftables()
        reference.apply(plan.full(render(snapshot, SETTINGS, node_ips))[0])
        assert self.incremental.dump() == reference.dump(), f"{step}: incremental syncs drifted from a full one"
        assert self.in_place.dump() == reference.dump(), f"{step}: a full sync in place left something behind"
        return str(transaction)


def test_incremental_syncs_converge_to_a_full_one_step_by_step() -> None:
    node = _Node()
    manifests: dict[str, list[dict]] = {}
    for origin, documents in MANIFESTS.items():  # one Service at a time
        manifests[origin] = documents
        node.sync(manifests, step=f"add {origin}")
    for name, change in STEPS:  # then changes that reshape chains, maps and sets
        current = {origin: docs for origin, docs in _documents(change).items() if origin in manifests}
        for origin in manifests.keys() - current.keys():
            del manifests[origin]
        manifests.update(current)
        text = node.sync(manifests, step=name)
        assert text and not text.startswith("add table"), f"{name}: not an incremental transaction"
    node.sync(manifests, node_ips=(NODE_IP, "10.244.1.1", "192.168.50.3"), step="a new node address")
    for origin in list(manifests):  # and every Service gone again
        del manifests[origin]
        node.sync(manifests, step=f"remove {origin}")
    table = node.incremental.tables()[("ip", "dataplane")]
    assert {name for name, held in table.sets.items() if held.elements} == {"nodeport-ips"}
    assert not any(name.startswith(("aff-", "cluster-", "local-")) for name in table.chains)


def test_a_new_affinity_timeout_converges_incrementally() -> None:
    node = _Node()
    node.sync({"sticky.yaml": MANIFESTS["sticky.yaml"]})
    timeout = _spec(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    node.sync({"sticky.yaml": _documents({"sticky": timeout})["sticky.yaml"]})


# --- the tracer follows nft's semantics -----------------------------------------------------------

TINY = """\
add table ip t
add chain ip t flt { type filter hook prerouting priority -110 ; policy accept ; }
add chain ip t pre { type nat hook prerouting priority -100 ; policy accept ; }
add chain ip t out { type nat hook output priority -100 ; policy accept ; }
add chain ip t post { type nat hook postrouting priority 100 ; policy accept ; }
add chain ip t to-a
add chain ip t to-b
add chain ip t returns
add chain ip t marks
add chain ip t dropper
add set ip t allow { type ipv4_addr . ipv4_addr ; flags interval ; }
add set ip t clients { type ipv4_addr ; flags dynamic,timeout ; timeout 60s ; }
add rule ip t to-a meta l4proto tcp dnat ip to 10.0.0.1:8080
add rule ip t to-b meta l4proto tcp dnat ip to 10.0.0.2
add rule ip t returns return
add rule ip t returns drop
add rule ip t marks meta mark set meta mark | 0x4000
add rule ip t dropper drop
add rule ip t flt ip daddr 1.1.1.5 drop
add rule ip t flt ip daddr 1.1.1.6 ip daddr . ip saddr != @allow reject
add rule ip t pre ip daddr 1.1.1.1 jump returns
add rule ip t pre ip daddr 1.1.1.1 goto to-a
add rule ip t pre ip daddr 1.1.1.2 goto returns
add rule ip t pre ip daddr 1.1.1.2 goto to-a
add rule ip t pre ip daddr 1.1.1.3 numgen random mod 3 vmap { 0 : goto to-a, 1 : goto to-b, 2 : goto dropper }
add rule ip t pre ip daddr { 1.1.1.4, 1.1.1.5, 1.1.1.6 } jump marks
add rule ip t pre ip daddr { 1.1.1.4-1.1.1.6 } goto to-b
add rule ip t pre ip daddr 1.1.1.7 ip saddr @clients goto to-a
add rule ip t pre ip daddr 1.1.1.7 update @clients { ip saddr } goto to-b
add rule ip t out goto to-a
add rule ip t post ct status dnat ip daddr 10.0.0.1 masquerade
add rule ip t post meta mark & 0x4000 != 0 masquerade
add element ip t allow { 1.1.1.6 . 192.168.0.0/16 }
"""


def _outcomes(nft: FakeNftables, daddr: str, saddr: str = "192.168.1.1", **packet) -> set[str]:
    return {str(o) for o in Tracer(nft).outcomes(Packet(saddr, daddr, **packet))}


@pytest.fixture
def tiny() -> FakeNftables:
    return loaded(TINY)


def test_jump_returns_to_the_next_rule_and_goto_does_not(tiny: FakeNftables) -> None:
    assert _outcomes(tiny, "1.1.1.1") == {"10.0.0.1:8080 masqueraded"}  # returned, then goto to-a
    assert _outcomes(tiny, "1.1.1.2") == {"ACCEPT (untranslated)"}  # the goto's return ends `pre`


def test_numgen_follows_every_branch(tiny: FakeNftables) -> None:
    assert _outcomes(tiny, "1.1.1.3") == {"10.0.0.1:8080 masqueraded", "10.0.0.2:80", DROP}


def test_marks_masquerade_and_dnat_keeps_the_port_when_none_given(tiny: FakeNftables) -> None:
    assert _outcomes(tiny, "1.1.1.4") == {"10.0.0.2:80 masqueraded"}
    assert _outcomes(tiny, "1.1.1.4", dport=443) == {"10.0.0.2:443 masqueraded"}


def test_filter_runs_before_nat_and_interval_concatenations_match(tiny: FakeNftables) -> None:
    assert _outcomes(tiny, "1.1.1.5") == {DROP}
    assert _outcomes(tiny, "1.1.1.6", saddr="192.168.7.7") == {"10.0.0.2:80 masqueraded"}
    assert _outcomes(tiny, "1.1.1.6", saddr="10.9.9.9") == {REJECT}


def test_the_node_s_own_packets_take_the_output_hook(tiny: FakeNftables) -> None:
    assert _outcomes(tiny, "1.1.1.5", from_node=True) == {"10.0.0.1:8080 masqueraded"}


def test_a_map_miss_or_a_protocol_mismatch_breaks_only_that_rule(tiny: FakeNftables) -> None:
    assert _outcomes(tiny, "1.1.1.9") == {"ACCEPT (untranslated)"}
    assert _outcomes(tiny, "1.1.1.1", protocol="udp") == {"ACCEPT (untranslated)"}  # `meta l4proto tcp` fails


def test_dynamic_sets_are_per_trace_until_learned(tiny: FakeNftables) -> None:
    tracer = Tracer(tiny)
    (first,) = tracer.trace(Packet("192.168.1.1", "1.1.1.7"))
    assert first.outcome == Outcome(DNAT, "10.0.0.2", 80) and first.learned
    assert tracer.outcomes(Packet("192.168.1.1", "1.1.1.7"), after=[first]) == {Outcome(DNAT, "10.0.0.1", 8080, True)}
    assert tracer.outcomes(Packet("192.168.1.2", "1.1.1.7"), after=[first]) == {Outcome(DNAT, "10.0.0.2", 80)}
    assert tracer.outcomes(Packet("192.168.1.1", "1.1.1.7"), after=[first], now=61) == {Outcome(DNAT, "10.0.0.2", 80)}
    assert tracer.outcomes(Packet("192.168.1.1", "1.1.1.7")) == {Outcome(DNAT, "10.0.0.2", 80)}  # nothing kept
    tiny.learn(first.learned)
    assert tracer.outcomes(Packet("192.168.1.1", "1.1.1.7")) == {Outcome(DNAT, "10.0.0.1", 8080, True)}


def test_a_drop_policy_drops_what_falls_through() -> None:
    nft = loaded(TINY.replace("priority -110 ; policy accept", "priority -110 ; policy drop"))
    assert _outcomes(nft, "1.1.1.9") == {DROP}


def test_the_tracer_refuses_what_it_does_not_model(tiny: FakeNftables) -> None:
    tiny.run("add chain ip t fib\nadd rule ip t fib fib daddr type local accept\nadd rule ip t pre jump fib")
    with pytest.raises(TraceError):
        Tracer(tiny).trace(Packet("192.168.1.1", "1.1.1.9"))


# --- the fake behind the proxier -------------------------------------------------------------------

DUAL_STACK = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dual", "namespace": "default"},
     "spec": {"clusterIP": "10.96.5.50", "clusterIPs": ["10.96.5.50", "fd00:96::50"],
              "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
              "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "dual-v6", "namespace": "default", "labels": {"kubernetes.io/service-name": "dual"}},
     "addressType": "IPv6", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
     "endpoints": [{"addresses": ["fd00:10:244::11"], "nodeName": NODE_NAME},
                   {"addresses": ["fd00:10:244::12"], "nodeName": NODE_NAME}]},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "dual-v4", "namespace": "default", "labels": {"kubernetes.io/service-name": "dual"}},
     "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
     "endpoints": [{"addresses": ["10.244.1.11"], "nodeName": NODE_NAME}]},
]


def _store(manifests: dict[str, list[dict]]) -> Store:
    store = Store()
    for origin, documents in manifests.items():
        objects, errors = parse_objects(copy.deepcopy(documents), origin)
        assert not errors, errors
        store.replace(origin, objects)
    return store


def _full_reference(snapshot) -> str:
    reference = FakeNftables()
    Proxier(SETTINGS, nft=reference).sync(snapshot, NODE_IPS + ("fd00:50::1",), full=True)
    return reference.dump()


def test_the_proxier_syncs_both_families_through_the_fake() -> None:
    nft = FakeNftables()
    proxier = Proxier(SETTINGS, nft=nft)
    store = _store({**MANIFESTS, "dual.yaml": DUAL_STACK})
    node_ips = NODE_IPS + ("fd00:50::1",)
    proxier.sync(store.snapshot(), node_ips, full=True)
    assert {table for table in nft.tables()} == {("ip", "dataplane"), ("ip6", "dataplane")}
    v6 = Tracer(nft).outcomes(Packet("fd00:10:244::99", "fd00:96::50", "tcp", 80))
    assert {o.endpoint for o in v6} == {"[fd00:10:244::11]:80", "[fd00:10:244::12]:80"}

    objects, _ = parse_objects(_documents({"all": _keep_endpoints(1)})["all.yaml"], "all.yaml")
    store.replace("all.yaml", objects)
    store.replace("none.yaml", None)
    result = proxier.sync(store.snapshot(), node_ips, full=False)
    assert 0 < result.commands < 20
    snapshot = store.snapshot()
    assert nft.dump() == _full_reference(snapshot)
    assert {o.endpoint for o in Tracer(nft).outcomes(Packet("192.168.50.2", cip(1), "tcp", 80))} == {"10.244.1.11:80"}


def test_a_full_resync_keeps_what_affinity_sets_learned() -> None:
    nft = FakeNftables()
    proxier = Proxier(SETTINGS, nft=nft, families=(4,))
    store = _store(MANIFESTS)
    proxier.sync(store.snapshot(), NODE_IPS, full=True)
    client = Packet("192.168.50.2", cip(10), "tcp", 80)
    first = Tracer(nft).trace(client)[-1]
    nft.learn(first.learned)
    proxier.sync(store.snapshot(), NODE_IPS, full=True)
    assert Tracer(nft).outcomes(client) == {first.outcome}


def test_the_proxier_replaces_a_table_whose_objects_changed_shape() -> None:
    """An in-place full sync is refused (a set of ours exists with another type); the proxier retries whole."""
    nft = loaded("add table ip dataplane\nadd set ip dataplane cluster-ips { type ipv4_addr ; flags interval ; }\n"
                 "add chain ip dataplane leftover\n")
    store = _store(MANIFESTS)
    Proxier(SETTINGS, nft=nft, families=(4,)).sync(store.snapshot(), NODE_IPS, full=True)
    reference = FakeNftables()
    Proxier(SETTINGS, nft=reference, families=(4,)).sync(store.snapshot(), NODE_IPS, full=True)
    assert nft.dump() == reference.dump() and "leftover" not in nft.dump()
    assert len(nft.applied) == 2  # the seed, then the replacing transaction: the refused one left no trace


def test_a_resync_with_nothing_changed_reuses_the_rulesets_and_still_repairs_the_kernel() -> None:
    """Rendering is skipped when the snapshot and node addresses are those last programmed; the
    transaction stays complete, so an element someone deleted behind our back comes back."""
    nft = FakeNftables()
    proxier = Proxier(SETTINGS, nft=nft, families=(4,))
    store = _store(MANIFESTS)
    proxier.sync(store.snapshot(), NODE_IPS, full=True)
    rendered, healthy = proxier.programmed[0].ruleset, nft.dump()
    nft.run("flush map ip dataplane service-ips\n")
    assert nft.dump() != healthy
    proxier.sync(store.snapshot(), NODE_IPS, full=True)
    assert proxier.programmed[0].ruleset is rendered and nft.dump() == healthy
    # Something changed (here the node addresses): rendered again.
    proxier.sync(store.snapshot(), NODE_IPS + ("192.168.50.9",), full=True)
    assert proxier.programmed[0].ruleset is not rendered


def test_a_resync_sends_nothing_while_no_transaction_was_committed_since_ours() -> None:
    """The ruleset generation (any commit in the namespace moves it on) says the kernel holds what the
    last sync left: a resync with nothing changed then sends nothing, and one after anyone's commit repairs."""
    nft = FakeNftables()
    proxier = Proxier(SETTINGS, nft=nft, families=(4,))
    store = _store(MANIFESTS)
    proxier.sync(store.snapshot(), NODE_IPS, full=True)
    objects, _ = parse_objects(_documents({"all": _keep_endpoints(1)})["all.yaml"], "all.yaml")
    store.replace("all.yaml", objects)
    assert proxier.sync(store.snapshot(), NODE_IPS, full=False).commands > 0
    healthy, commits = nft.dump(), len(nft.applied)

    result = proxier.sync(store.snapshot(), NODE_IPS, full=True)
    assert result.verified and result.commands == 0 and len(nft.applied) == commits

    nft.run("flush map ip dataplane service-ips\n")  # behind our back: a commit
    result = proxier.sync(store.snapshot(), NODE_IPS, full=True)
    assert not result.verified and result.commands > 0 and nft.dump() == healthy
    assert proxier.sync(store.snapshot(), NODE_IPS, full=True).verified  # and trusted again after it

    nft.run("add table ip someone-else\n")  # another table's commit: the generation cannot tell whose
    assert not proxier.sync(store.snapshot(), NODE_IPS, full=True).verified


def test_a_partial_sync_after_an_outside_commit_does_not_vouch_for_the_kernel() -> None:
    """A partial sync is a difference from what we last left: on top of someone else's change it
    leaves a kernel we do not know, and the next resync with nothing changed must rewrite it."""
    nft = FakeNftables()
    proxier = Proxier(SETTINGS, nft=nft, families=(4,))
    store = _store(MANIFESTS)
    proxier.sync(store.snapshot(), NODE_IPS, full=True)
    nft.run("add chain ip dataplane intruder\n")
    objects, _ = parse_objects(_documents({"all": _keep_endpoints(1)})["all.yaml"], "all.yaml")
    store.replace("all.yaml", objects)
    assert proxier.sync(store.snapshot(), NODE_IPS, full=False).commands > 0
    assert "intruder" in nft.dump()
    result = proxier.sync(store.snapshot(), NODE_IPS, full=True)
    assert not result.verified and nft.dump() == _full_reference_v4(store.snapshot())


def _full_reference_v4(snapshot) -> str:
    reference = FakeNftables()
    Proxier(SETTINGS, nft=reference, families=(4,)).sync(snapshot, NODE_IPS, full=True)
    return reference.dump()
