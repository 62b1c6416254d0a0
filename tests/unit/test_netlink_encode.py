"""The netlink encoder without a kernel: registers, folded bitwise, literal layouts, element chunking,
what it refuses (so the text path takes it), and that every rendered ruleset encodes.

That the kernel accepts these messages, and lists them as nft's own, is
tests/e2e/test_nftables_kernel.py.

Address plan: Pods 10.244.0.0/16, ClusterIPs 10.96.0.0/12, node 192.168.50.1.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from dataplane.config import NodeSettings
from dataplane.nat import layout, plan
from dataplane.nat.encode import Encoder, TextKeys, Unsupported, _bitwise, reg
from dataplane.nat.expr import MARK, AnonSet, BinOp, Interval, Match, Rule, Verdict
from dataplane.nat.render import RulesetBuilder
from dataplane.nat.ruleset import AddRule, Chain, Container, Element, Elements, Operation, Table, Transaction
from dataplane.nat.userspace import QueueSpec, UserspaceRules
from dataplane.sync.manifests import ManifestSource
from dataplane.model import parse_objects
from dataplane.sync.store import Store
from tests import flows

GOLDEN = Path(__file__).parent.parent / "golden"
TABLE = Table("ip", "dataplane")
SETTINGS = NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",), service_cidrs=("10.96.0.0/12",))


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type without flags, payload) of each attribute at this level."""
    out, offset = [], 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        out.append((kind & 0x3FFF, data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return out


def expressions(rule_body: bytes) -> list[str]:
    """The names of a NEWRULE body's expressions, in order."""
    (listed,) = [payload for kind, payload in attrs(rule_body) if kind == 4]
    return [dict(attrs(expr))[1].rstrip(b"\0").decode() for _, expr in attrs(listed)]


@pytest.mark.parametrize("offset, register", [(0, 1), (1, 9), (2, 10), (3, 11), (4, 2), (5, 13), (8, 3)])
def test_registers_are_named_as_nft_names_them(offset: int, register: int) -> None:
    assert reg(offset) == register


@pytest.mark.parametrize("expr, mask, xor", [
    (BinOp(MARK, "&", 0x4000), 0x4000, 0),
    (BinOp(MARK, "|", 0x4000), 0xFFFFBFFF, 0x4000),
    (BinOp(MARK, "^", 0x4000), 0xFFFFFFFF, 0x4000),
    (BinOp(BinOp(MARK, "&", 0xFFFF1FFF), "|", 0x2000), 0xFFFF1FFF, 0x2000),
])
def test_chains_of_bitwise_operators_fold_into_one_mask_and_xor(expr: BinOp, mask: int, xor: int) -> None:
    assert _bitwise(expr) == (mask, xor)


@pytest.mark.parametrize("types, text, expected", [
    (("ipv4_addr", "inet_proto", "inet_service", "integer"), "10.96.0.1 . tcp . 80 . 3",
     bytes.fromhex("0a600001") + b"\x06\0\0\0" + b"\x00\x50\0\0" + struct.pack("=I", 3)),
    (("ipv4_addr", "inet_service"), "10.244.1.1 . 8080", bytes.fromhex("0af40101") + b"\x1f\x90\0\0"),
    (("mark",), "0x00010001", struct.pack("=I", 0x10001)),
    (("ipv6_addr",), "fd00::1", bytes.fromhex("fd000000000000000000000000000001")),
    (("inet_proto", "inet_service"), "udp . 53", b"\x11\0\0\0\x00\x35\0\0"),
])
def test_element_text_becomes_the_kernels_key_layout(types, text, expected) -> None:
    encoded = TextKeys().data_attr(1, types)(text)
    ((kind, inner),) = attrs(encoded)
    ((value_kind, value),) = attrs(inner)
    assert (kind, value_kind, value) == (1, 1, expected)


def test_interval_concatenation_keys_carry_a_start_and_an_end() -> None:
    types = ("ipv4_addr", "inet_proto", "inet_service", "ipv4_addr")
    start, end = TextKeys().interval_concat(types, "198.51.100.1 . tcp . 80 . 10.0.0.0/8")
    assert start[-4:] == bytes.fromhex("0a000000") and end[-4:] == bytes.fromhex("0affffff")
    assert start[:12] == end[:12]


def _declared(*containers: Container) -> Encoder:
    encoder = Encoder()
    encoder.commit(Transaction([Operation("add", TABLE), *(Operation("add", TABLE, c) for c in containers)]))
    return encoder


def test_elements_are_split_below_the_16_bit_attribute_length() -> None:
    encoder = _declared(Container(layout.SERVICE_IPS, ("ipv4_addr", "inet_proto", "inet_service"), ("verdict",)))
    elements = tuple(Element(layout.SERVICE_IPS, f"10.96.{i // 250}.{i % 250 + 1} . tcp . 80", "goto cluster-3",
                             f"default/service-{i}:http") for i in range(5000))
    messages = encoder.encode(Transaction([Operation("add", TABLE, Elements(layout.SERVICE_IPS, elements))]))
    assert len(messages) > 1
    found = 0
    for message in messages:
        (listed,) = [payload for kind, payload in attrs(message.body) if kind == 3]
        assert len(listed) + 4 < 1 << 16
        found += len(attrs(listed))
    assert found == len(elements)


@pytest.mark.parametrize("tx, why", [
    (Transaction(["add table ip dataplane"]), "text"),
    (Transaction([Operation("add", TABLE, Elements("nowhere", (Element("nowhere", "10.0.0.1"),)))]), "never declared"),
    (Transaction([Operation("add", TABLE, Container("odd", ("ether_addr",), kind="set"))]), "ether_addr"),
    (Transaction([Operation("flush", TABLE, Container("cluster-ips", ("ipv4_addr",), kind="set"))]), "flush"),
])
def test_what_the_encoder_cannot_express_is_refused_before_anything_is_sent(tx: Transaction, why: str) -> None:
    with pytest.raises(Unsupported, match=why):
        Encoder().encode(tx)


def test_declarations_are_remembered_only_once_committed_and_forgotten_with_their_table() -> None:
    declare = Transaction([Operation("add", TABLE),
                           Operation("add", TABLE, Container("ips", ("ipv4_addr",), kind="set"))])
    fill = Transaction([Operation("add", TABLE, Elements("ips", (Element("ips", "10.96.0.1"),)))])
    encoder = Encoder()
    encoder.encode(declare)
    with pytest.raises(Unsupported):
        encoder.encode(fill)
    encoder.commit(declare)
    assert len(encoder.encode(fill)) == 1
    encoder.commit(Transaction([Operation("delete", TABLE)]))
    with pytest.raises(Unsupported):
        encoder.encode(fill)


def test_a_cidr_set_is_merged_and_bounded_as_nft_writes_it() -> None:
    pods = Match((layout.Family(4).saddr,), "", AnonSet(((_cidr("10.244.0.0/16"),), (_cidr("10.128.0.0/9"),))))
    tx = Transaction([Operation("add", TABLE, Chain("c")),
                      Operation("add", TABLE, AddRule("c", Rule.of(pods, Verdict("accept"))))])
    messages = Encoder().encode(tx)
    elements = next(m for m in messages if m.type == 12)  # NFT_MSG_NEWSETELEM of the anonymous set
    (listed,) = [payload for kind, payload in attrs(elements.body) if kind == 3]
    found = []
    for _, element in attrs(listed):
        fields = dict(attrs(element))
        end = 3 in fields
        found.append((dict(attrs(fields[1]))[1].hex(), end))
    # 10.244/16 lies inside 10.128/9: one range, with the gap below it closed
    assert found == [("00000000", True), ("0a800000", False), ("0b000000", True)]
    assert expressions(messages[-1].body) == ["payload", "lookup", "immediate"]


def _cidr(text: str) -> Interval:
    import ipaddress

    network = ipaddress.ip_network(text)
    return Interval(network.network_address, network.broadcast_address)


def test_one_cidr_is_a_prefix_compare_not_a_set() -> None:
    rule = Rule.of(layout.in_cidrs(layout.Family(4).saddr, ["10.244.0.0/16"], negate=True), Verdict("drop"))
    messages = Encoder().encode(Transaction([Operation("add", TABLE, AddRule("c", rule))]))
    assert len(messages) == 1
    assert expressions(messages[0].body) == ["payload", "cmp", "immediate"]
    rule = Rule.of(layout.in_cidrs(layout.Family(4).daddr, ["10.96.0.0/12"]), Verdict("drop"))
    messages = Encoder().encode(Transaction([Operation("add", TABLE, AddRule("c", rule))]))
    assert expressions(messages[0].body) == ["payload", "bitwise", "cmp", "immediate"]


def _golden_transactions():
    for case in ("basic", "terminating", "flows"):
        store = Store()
        if case == "flows":  # the packet-flow table's dual-stack cluster, table-balanced Services included
            for origin, documents in {**flows.MANIFESTS, **flows.MANIFESTS6}.items():
                store.replace(origin, parse_objects(documents, origin)[0])
        else:
            ManifestSource(GOLDEN / f"{case}.yaml", store).load_all()
        snapshot = store.snapshot()
        for version in (4, 6):
            ruleset = RulesetBuilder(SETTINGS, version).build(snapshot, ("192.168.50.1", "fd00:50::1"))
            yield f"{case}-ip{version}", plan.full(ruleset)[0]
            for queue in (QueueSpec(count=2), QueueSpec(count=1, in_nft=True)):
                extended = UserspaceRules(SETTINGS, layout.Family(version), queue).extend(ruleset, snapshot)
                yield f"{case}-ip{version}-userspace-{queue.in_nft}", plan.full(extended)[0]


def _rule_bodies(tx: Transaction, chain_prefix: str) -> list[tuple[str, bytes]]:
    """(rule text, NEWRULE body) of the rules in chains named `chain_prefix...`, in order."""
    messages = [m for m in Encoder().encode(tx) if m.type == 6]
    rules = [op.subject for op in tx if isinstance(op.subject, AddRule)]
    assert len(rules) == len(messages)
    return [(str(add.rule), m.body) for add, m in zip(rules, messages) if add.chain.startswith(chain_prefix)]


def _expression_attrs(rule_body: bytes, name: str) -> list[dict[int, bytes]]:
    (listed,) = [payload for kind, payload in attrs(rule_body) if kind == 4]
    found = []
    for _, expr in attrs(listed):
        fields = dict(attrs(expr))
        if fields[1].rstrip(b"\0").decode() == name:
            found.append(dict(attrs(fields[2])))
    return found


def _maglev_transaction(version: int, affinity: bool = False) -> Transaction:
    family = layout.Family(version)
    ip, endpoint = ("10.96.7.1", "10.244.1.1") if version == 4 else ("fd00:10:96::7", "fd00:10:244::1")
    spec = {"clusterIP": ip, "type": "NodePort", "ports": [{"name": "p", "port": 53, "protocol": "UDP", "nodePort": 30701}]}
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    documents = [
        {"kind": "Service", "metadata": {"name": "m", "namespace": "default",
                                          "annotations": {"dataplane.io/lb-algorithm": "maglev",
                                                          "dataplane.io/lb-table-size": "7"}}, "spec": spec},
        {"kind": "EndpointSlice", "addressType": f"IPv{version}",
         "metadata": {"name": "m-x", "namespace": "default", "labels": {"kubernetes.io/service-name": "m"}},
         "ports": [{"name": "p", "port": 8080, "protocol": "UDP"}],
         "endpoints": [{"addresses": [endpoint], "nodeName": "node-a"}]},
    ]
    store = Store()
    store.replace("m.yaml", parse_objects(documents, "m.yaml")[0])
    node_ip = "192.168.50.1" if version == 4 else "fd00:50::1"
    assert family.nft in ("ip", "ip6")
    return plan.full(RulesetBuilder(SETTINGS, version).build(store.snapshot(), (node_ip,)))[0]


# (family, jhash input length, hash source register in the dnat, in the affinity vmap): the registers are
# the ones nft 1.0.6 allocates (the kernel holds the same as after nft's own batch, packets go where the table
# says: tests/e2e/test_nftables_kernel.py, test_tables_kernel.py)
@pytest.mark.parametrize("version, length, dnat_sreg, vmap_sreg", [(4, 8, 14, 2), (6, 20, 14, 2)])
def test_a_balancing_tables_hash_is_encoded_as_nft_writes_it(version: int, length: int, dnat_sreg: int,
                                                            vmap_sreg: int) -> None:
    seed = SETTINGS.hash_seed
    for text, body in _rule_bodies(_maglev_transaction(version), "hash-pick-"):
        assert expressions(body) == ["meta", "lookup", "meta", "bitwise", "payload", "payload", "hash", "lookup",
                                     "nat"], text
        (hashed,) = _expression_attrs(body, "hash")
        words = {kind: struct.unpack(">I", value)[0] for kind, value in hashed.items()}
        # sreg, dreg (the second word of the slot map's key), len, modulus, seed, offset, type jhash
        assert words == {1: dnat_sreg, 2: 9, 3: length, 4: 7, 5: seed, 6: 0, 7: 0}
        (_, sport) = _expression_attrs(body, "payload")
        assert struct.unpack(">I", sport[1])[0] == dnat_sreg + 1 + (version == 6) * 3  # after the address
    (pick,) = [body for text, body in _rule_bodies(_maglev_transaction(version, affinity=True), "aff-")
               if "jhash" in text]
    (hashed,) = _expression_attrs(pick, "hash")
    assert struct.unpack(">I", hashed[1])[0] == vmap_sreg and struct.unpack(">I", hashed[2])[0] == 1


def test_a_table_id_rides_in_the_mark_from_a_map_lookup() -> None:
    (set_id, *_), = [[body for text, body in _rule_bodies(_maglev_transaction(4), "hash-cluster-")]]
    assert expressions(set_id) == ["payload", "meta", "payload", "lookup", "meta"]
    (lookup,) = _expression_attrs(set_id, "lookup")
    assert lookup[1].rstrip(b"\0") == layout.TABLE_IDS.encode()
    assert struct.unpack(">I", lookup[2])[0] == 1 and struct.unpack(">I", lookup[3])[0] == 1  # sreg, dreg
    (_, meta_set) = _expression_attrs(set_id, "meta")
    assert {k: struct.unpack(">I", v)[0] for k, v in meta_set.items()} == {2: 3, 3: 1}  # key mark, sreg 1


def test_slot_elements_are_a_mark_and_a_slot_to_an_address_and_port() -> None:
    encoder = _declared(layout.declare(layout.HashPick(7), SETTINGS, layout.Family(4))[0])
    name = layout.slots_map(7)
    tx = Transaction([Operation("add", TABLE, Elements(name, (Element(name, "0x3f871165 . 6", "10.244.1.2 . 8080"),)))])
    (message,) = encoder.encode(tx)
    (listed,) = [payload for kind, payload in attrs(message.body) if kind == 3]
    ((_, element),) = attrs(listed)
    fields = {kind: dict(attrs(value))[1] for kind, value in attrs(element)}
    assert fields == {1: struct.pack("=II", 0x3F871165, 6), 2: bytes.fromhex("0af40102") + b"\x1f\x90\0\0"}


@pytest.mark.parametrize("name, tx", list(_golden_transactions()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_rendered_ruleset_encodes_without_the_text_path(name: str, tx: Transaction) -> None:
    messages = Encoder().encode(tx)
    rules = [m for m in messages if m.type == 6]  # NFT_MSG_NEWRULE
    assert len(rules) == sum(isinstance(op.subject, AddRule) for op in tx)
    used = {name for m in rules for name in expressions(m.body)}
    assert {"payload", "meta", "lookup", "masq", "reject", "immediate", "ct", "fib"} <= used
    picks = not name.startswith(("basic-ip6", "terminating-ip6"))  # those have no IPv6 Service
    if picks:
        assert {"nat", "numgen"} <= used
    if "userspace" in name:
        assert ("objref" in used) == picks  # the fail-open counter, before each pick
        assert ("queue" in used) == name.endswith("True")
    if name.startswith("basic-ip4"):
        assert "dynset" in used  # session affinity
    if name.startswith("flows"):
        assert "hash" in used  # the Maglev and weighted Services' balancing tables
