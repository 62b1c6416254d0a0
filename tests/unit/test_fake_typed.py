"""The fake's typed path: `apply(tx)` runs the planner's Operations as values, `run(text)` parses first.

Both must end in the same state, the parser must give back exactly the
values the layout built, and a Transaction that breaks a kernel check must
be refused as its script is (same errno, same wording), naming the command.

Address plan: Pods 10.244.0.0/16, ClusterIPs 10.96.0.0/12, node 192.168.50.1
(tests/flows.py for the flow-table manifests; fd00:... for their IPv6 rows);
the hand-built tables use 10.0.0.0/24 for endpoints.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from dataplane.config import NodeSettings
from dataplane.model import parse_objects
from dataplane.nat import layout, plan
from dataplane.nat.expr import (
    DPORT, L4PROTO, MARK, BinOp, Match, Nat, Reject, Rule, SetMeta, SetRef, Verdict, Vmap, daddr, saddr,
)
from dataplane.nat.fake import FakeNftables, parse
from dataplane.nat.nftables import NftError
from dataplane.nat.render import render
from dataplane.nat.ruleset import (
    AddRule, BaseChain, Chain, Container, Element, Elements, Operation, Table, Transaction,
)
from dataplane.nat.userspace import QueueSpec, UserspaceRules
from dataplane.sync.manifests import ManifestSource
from dataplane.sync.store import Store
from tests import flows
from tests.unit.test_fake_nftables import BASE, REFUSED, loaded

GOLDEN = Path(__file__).parent.parent / "golden"
GOLDEN_SETTINGS = {
    "basic": NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",)),
    "terminating": NodeSettings(node_name="node-a", masquerade_all=True),
}
FLOW_SETTINGS = NodeSettings(node_name=flows.NODE_NAME, cluster_cidrs=(flows.CLUSTER_CIDR, flows.CLUSTER_CIDR6),
                             service_cidrs=(flows.SERVICE_CIDR, flows.SERVICE_CIDR6), node_zone=flows.NODE_ZONE)
FLOW_NODE_IPS = (flows.NODE_IP, "10.244.1.1", flows.NODE_IP6, "fd00:244:1::1")


def _golden(case: str) -> Transaction:
    store = Store()
    ManifestSource(GOLDEN / f"{case}.yaml", store).load_all()
    return plan.full(render(store.snapshot(), GOLDEN_SETTINGS[case], ("192.168.50.1",)))[0]


def _flow_table(mode: str) -> Transaction:
    """Both families of the flow-table manifests; userspace mode with and without nft's own `queue`."""
    store = Store()
    for origin, documents in {**flows.MANIFESTS, **flows.MANIFESTS6}.items():
        objects, errors = parse_objects(documents, origin)
        assert not errors, errors
        store.replace(origin, objects)
    snapshot = store.snapshot()
    tx = Transaction()
    for family in (4, 6):
        ruleset = render(snapshot, FLOW_SETTINGS, FLOW_NODE_IPS, family)
        if mode != "kernel":
            queue = QueueSpec(count=2, in_nft=mode == "userspace-nft-queue")
            ruleset = UserspaceRules(FLOW_SETTINGS, layout.Family(family), queue).extend(ruleset, snapshot)
        tx.extend(plan.full(ruleset)[0].commands)
    return tx


INPUTS = ["golden-basic", "golden-terminating", "flows-kernel", "flows-userspace", "flows-userspace-nft-queue"]


@cache
def transaction(name: str) -> Transaction:
    kind, _, case = name.partition("-")
    return _golden(case) if kind == "golden" else _flow_table(case)


@pytest.mark.parametrize("name", INPUTS)
def test_applying_the_values_and_running_their_text_end_alike(name: str) -> None:
    tx = transaction(name)
    typed, text = FakeNftables(), FakeNftables()
    typed.apply(tx)
    text.run(str(tx))
    assert typed.dump() == text.dump()
    assert "chain services" in typed.dump()


@pytest.mark.parametrize("name", INPUTS)
def test_the_parser_gives_back_the_layout_s_values(name: str) -> None:
    tx = transaction(name)
    text = str(tx)
    parsed = parse(text)
    assert str(Transaction(parsed)) == text
    rules = [(c, p) for c, p in zip(tx, parsed) if isinstance(c.subject, AddRule)]
    assert rules and all(p == c for c, p in rules), next(f"{c}\n{p}" for c, p in rules if p != c)
    # Declarations and elements are the same commands; a Container's `dynamic` is the planner's own note.
    for command, again in zip(tx, parsed):
        if isinstance(command.subject, Chain):
            assert again == Operation(command.verb, command.table, Chain(command.subject.name, base=command.subject.base))
        elif isinstance(command.subject, Elements) or command.subject is None:
            assert again == command


def test_a_stored_rule_is_the_layout_s_own_object() -> None:
    tx = transaction("flows-userspace")
    nft = FakeNftables()
    nft.apply(tx)
    built = {id(c.subject.rule) for c in tx if isinstance(c.subject, AddRule)}
    held = [rule for table in nft.tables().values() for chain in table.chains.values() for rule in chain.rules]
    assert held and all(id(rule) in built for rule in held)


# --- kernel checks hold on the typed path ---------------------------------------------------------


@pytest.mark.parametrize("name, script, code, fragment", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_transaction_breaking_a_kernel_check_is_refused_as_its_script_is(name, script, code, fragment) -> None:
    commands = parse(script)
    typed, text = loaded(), loaded()
    with pytest.raises(NftError) as by_value:
        typed.apply(Transaction(commands))
    with pytest.raises(NftError) as by_text:
        text.run(script)
    assert fragment in str(by_value.value)
    assert by_value.value.errno == by_text.value.errno == code
    assert _reason(by_value.value) == _reason(by_text.value)
    assert typed.dump() == loaded().dump()


def _reason(error: NftError) -> str:
    """What failed, without where: the text after `Error: ` on its line."""
    return str(error).split("Error: ", 1)[1].split("\n", 1)[0]


T = Table("ip", "t")
FOUR = daddr("ip")
# Values a script could not even spell, or that the parser used to refuse: the executor refuses them too.
BUILT = [
    ("ip6-field-in-an-ip-table", Operation("add", T, AddRule("c", Rule.of(Match((saddr("ip6"),), "", (
        ipaddress.ip_address("fd00::1"),)), Verdict("drop")))), "ip6 saddr cannot be used in an ip table"),
    ("address-of-the-other-family", Operation("add", T, AddRule("c", Rule.of(Match((FOUR,), "", (
        ipaddress.ip_address("fd00::1"),)), Verdict("drop")))), "datatype mismatch"),
    ("port-out-of-range", Operation("add", T, AddRule("c", Rule.of(Match((DPORT,), "", (70000,)), Verdict("drop")))),
     "datatype mismatch"),
    ("statement-after-a-verdict", Operation("add", T, AddRule("c", Rule.of(Verdict("drop"), Verdict("accept")))),
     "after a terminal"),
    ("fixed-port-without-protocol-match", Operation("add", T, AddRule("c", Rule.of(
        Nat("dnat", "ip", address=ipaddress.ip_address("10.0.0.1"), port=80)))), "transport protocol mapping"),
    ("dnat-of-the-other-family", Operation("add", T, AddRule("c", Rule.of(
        Match((L4PROTO,), "", (6,)), Nat("dnat", "ip6", address=ipaddress.ip_address("fd00::1"), port=80)))),
     "dnat ip6 in an ip table"),
    ("reject-of-the-other-family", Operation("add", T, AddRule("c", Rule.of(Reject("icmpv6 type port-unreachable")))),
     "does not fit"),
    ("mask-on-an-address", Operation("add", T, AddRule("c", Rule.of(SetMeta(MARK, BinOp(FOUR, "&", 1))))),
     "integer expression"),
    ("vmap-keyed-otherwise", Operation("add", T, AddRule("c", Rule.of(Vmap((FOUR, DPORT), SetRef("m"))))),
     "datatype mismatch"),
    ("map-without-data-type", Operation("add", T, Container("x", ("ipv4_addr",))), "data type"),
    ("unknown-set-flag", Operation("add", T, Container("x", ("ipv4_addr",), kind="set", flags=("sparse",))),
     "sparse"),
    ("chain-made-another-base", Operation("add", T, Chain("pre", base=BaseChain("filter", "prerouting", 0))),
     "chain pre"),
    ("element-of-a-missing-chain", Operation("add", T, Elements("m", (
        Element("m", "10.96.0.2 . tcp . 80", "goto nowhere"),))), "nowhere"),
    ("element-key-in-two-parts", Operation("add", T, Elements("m", (
        Element("m", "10.96.0.2 . tcp . 80", "goto c"), Element("m", "10.96.0.3 . tcp", "goto c")))), "has 2 parts"),
]


# What the kernel takes but the fake does not model: refused, never silently mis-modelled.
UNMODELLED = [
    ("payload-mangling", Operation("add", T, AddRule("c", Rule.of(SetMeta(DPORT, 1)))), "can be set"),
    ("ether-addr-set", Operation("add", T, Container("x", ("ether_addr",), kind="set")), "ether_addr"),
]


@pytest.mark.parametrize("name, operation, fragment", BUILT + UNMODELLED, ids=[b[0] for b in BUILT + UNMODELLED])
def test_built_values_are_held_to_the_kernel_s_checks(name: str, operation: Operation, fragment: str) -> None:
    nft = loaded()
    before = nft.dump()
    with pytest.raises(NftError) as raised:
        nft.apply(Transaction([Operation("add", T, Container("fresh", ("ipv4_addr",), kind="set")), operation]))
    message = str(raised.value)
    assert fragment in message
    assert nft.dump() == before  # atomic: the first command is gone too


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nft") or not shutil.which("unshare"),
                    reason="kernel comparison: needs root, nft and unshare")
def test_the_kernel_refuses_the_built_values_too() -> None:
    """Each BUILT value's text, in a fresh network namespace: these are kernel checks, not the fake's whims."""
    accepted = []
    for name, operation, _ in BUILT:
        done = subprocess.run(["unshare", "-n", "nft", "-f", "-"], input=f"{BASE}{operation}\n", capture_output=True,
                              text=True, check=False)
        if done.returncode == 0:
            accepted.append(name)
    assert accepted == []


def test_a_refusal_names_the_command_and_only_the_failing_element() -> None:
    nft = loaded()
    rule = Operation("add", T, AddRule("c", Rule.of(Verdict("jump", "nowhere"))))
    with pytest.raises(NftError) as raised:
        nft.apply(Transaction([rule]))
    assert str(raised.value) == f"Error: Could not process rule: No such file or directory (chain nowhere)\n{rule}"
    assert raised.value.is_not_found()
    many = Operation("delete", T, Elements("s", tuple(Element("s", f"10.0.0.{i}") for i in range(1, 200))))
    with pytest.raises(NftError) as raised:
        nft.apply(Transaction([many]))
    assert str(raised.value).endswith("\ndelete element ip t s { 10.0.0.1 }")


def test_check_refuses_without_applying_and_accepts_what_apply_takes() -> None:
    nft = loaded()
    before = nft.dump()
    add = Transaction([Operation("add", T, Elements("s", (Element("s", "10.0.0.7"),)))])
    nft.check(add)
    assert nft.dump() == before
    with pytest.raises(NftError):
        nft.check(Transaction([Operation("delete", T, Elements("s", (Element("s", "10.0.0.7"),)))]))
    nft.apply(add)
    assert nft.elements("ip", "t", "s") == {"10.0.0.7": ""}
    assert [str(tx) for tx in nft.applied][-1] == str(add)


def test_base_chain_policy_is_a_value_both_ways() -> None:
    drop = Operation("add", T, Chain("f2", base=BaseChain("filter", "input", 0, "drop")))
    assert str(drop) == "add chain ip t f2 { type filter hook input priority 0 ; policy drop ; }"
    assert parse(str(drop)) == [drop]
    typed, text = loaded(), loaded(BASE)
    typed.apply(Transaction([drop]))
    text.run(str(drop))
    assert typed.dump() == text.dump() and "policy drop;" in typed.dump()


def test_named_counters_are_listed_uncounted_and_a_missing_table_is_not_found() -> None:
    nft = FakeNftables()
    nft.apply(transaction("flows-userspace"))
    assert nft.counters("ip", "dataplane") == {"fail-open": (0, 0)}
    with pytest.raises(NftError) as raised:
        nft.counters("ip", "missing")
    assert raised.value.is_not_found()


def test_apply_neither_renders_nor_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The typed path is the values all the way: no str() of a command or rule, no parser."""
    tx = transaction("flows-userspace-nft-queue")
    reference = FakeNftables()
    reference.apply(tx)

    def refuse(*args, **kwargs):
        raise AssertionError("the typed path rendered or parsed text")

    from dataplane.nat.fake import memory

    monkeypatch.setattr(Operation, "__str__", refuse)
    monkeypatch.setattr(Rule, "__str__", refuse)
    monkeypatch.setattr(Rule, "text", property(refuse))
    monkeypatch.setattr(memory, "parse_located", refuse)
    nft = FakeNftables()
    nft.apply(tx)
    nft.check(tx)
    monkeypatch.undo()
    assert nft.dump() == reference.dump()
