"""The planner and both appliers against the real kernel, each in throwaway network namespaces.

- every golden ruleset is accepted by nft;
- the netlink applier and the nft text applier, given the same transactions
  (full, incremental, in place, userspace mode, both families), leave tables
  that `nft list` prints identically;
- any sequence of incremental transactions leaves the kernel exactly where
  one full transaction of the final state would (with either applier);
- a transaction the kernel refuses changes nothing, and its errno is classified;
- other software's tables survive full and incremental syncs.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dataplane.config import NodeSettings
from dataplane.lab.manifests import endpoint_slice, port, service
from dataplane.model import parse_objects
from dataplane.nat import layout, plan
from dataplane.nat.expr import Rule, Verdict
from dataplane.nat.nftables import APPLIERS, NftCommand, NftError, Nftables
from dataplane.nat.render import RulesetBuilder
from dataplane.nat.ruleset import AddRule, BaseChain, Chain, Container, Operation, Table, Transaction
from dataplane.nat.userspace import QueueSpec, UserspaceRules
from dataplane.sync.manifests import ManifestSource
from dataplane.sync.store import Store
from tests import flows

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed"),
]

GOLDEN = Path(__file__).parent.parent / "golden"
SETTINGS = NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16",))


def _namespace_nft(applier: str):
    """An Nftables with `applier` in a fresh namespace; a generator for fixtures."""
    name = f"dp-nft-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield Nftables(NftCommand(["ip", "netns", "exec", name, "nft"]), applier=applier, netns=name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(params=APPLIERS)
def nft(request):
    """Each test below runs once per applier."""
    yield from _namespace_nft(request.param)


@pytest.fixture
def pair():
    """(text applier, netlink applier), each in a namespace of its own."""
    text, netlink = _namespace_nft("nft"), _namespace_nft("netlink")
    try:
        yield next(text), next(netlink)
    finally:
        text.close()
        netlink.close()


def apply_both(pair: tuple[Nftables, Nftables], tx: Transaction) -> None:
    text, netlink = pair
    text.apply(tx)
    netlink.apply(tx)
    # Every transaction the daemon makes, the balancing tables' jhash and mark-map statements included.
    assert netlink.fallbacks == 0, "the netlink applier handed a typed transaction to nft"


def assert_same_tables(pair: tuple[Nftables, Nftables], families=("ip", "ip6")) -> None:
    text, netlink = pair
    for family in families:
        assert table_state(netlink, family) == table_state(text, family), f"{family} dataplane differs"


def table_state(nft: Nftables, family: str = "ip", table: str = "dataplane") -> list:
    """The table as nft reports it, with set elements sorted: hash order is not ours."""
    listing = json.loads(_list_json(nft, family, table))
    items = []
    for entry in listing["nftables"]:
        body = next(iter(entry.values()))
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k not in ("handle", "version")}
            if "elem" in body:
                body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
        items.append(json.dumps(body, sort_keys=True))
    return sorted(items)


def _list_json(nft: Nftables, family: str, table: str) -> str:
    argv = nft._backend._argv + ["-j", "list", "table", family, table]  # listing is test-only
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode and "No such file or directory" in done.stderr:
        return '{"nftables": []}'
    done.check_returncode()
    return done.stdout


@pytest.mark.parametrize("golden", sorted(p.name for p in GOLDEN.glob("*.nft")))
def test_golden_ruleset_is_accepted_by_nft(pair, golden: str) -> None:
    pair[0].run((GOLDEN / golden).read_text(), check_only=True)


# Golden manifests with the settings their rulesets were rendered with, plus a service CIDR
# (the unallocated-address drop rule) and both families.
GOLDEN_SETTINGS = {
    "basic": NodeSettings(node_name="node-a", cluster_cidrs=("10.244.0.0/16", "fd00:10:244::/48"),
                          service_cidrs=("10.96.0.0/12", "fd00:10:96::/108")),
    "terminating": NodeSettings(node_name="node-a", masquerade_all=True),
    # The packet-flow table's dual-stack cluster: every Service kind and policy in both families.
    "flows": NodeSettings(node_name=flows.NODE_NAME, cluster_cidrs=(flows.CLUSTER_CIDR, flows.CLUSTER_CIDR6),
                          service_cidrs=(flows.SERVICE_CIDR, flows.SERVICE_CIDR6), node_zone=flows.NODE_ZONE),
}
NODE_IPS = ("192.168.50.1", "fd00:50::1", flows.NODE_IP, flows.NODE_IP6)


def _golden_snapshot(case: str):
    store = Store()
    if case == "flows":
        for origin, documents in {**flows.MANIFESTS, **flows.MANIFESTS6}.items():
            store.replace(origin, parse_objects(documents, origin)[0])
    else:
        ManifestSource(GOLDEN / f"{case}.yaml", store).load_all()
    return store.snapshot()


@pytest.mark.parametrize("userspace", [False, True], ids=["kernel-mode", "userspace-mode"])
@pytest.mark.parametrize("case", sorted(GOLDEN_SETTINGS))
def test_both_appliers_program_the_same_golden_tables(pair, case: str, userspace: bool) -> None:
    snapshot, settings = _golden_snapshot(case), GOLDEN_SETTINGS[case]
    tx = Transaction()
    for version in (4, 6):
        ruleset = RulesetBuilder(settings, version).build(snapshot, NODE_IPS)
        if userspace:  # a kernel without nft's queue: the NFQUEUE rule is iptables', not ours
            ruleset = UserspaceRules(settings, layout.Family(version), QueueSpec(count=2)).extend(ruleset, snapshot)
        tx.extend(plan.full(ruleset)[0].commands)
    apply_both(pair, tx)
    assert_same_tables(pair)
    assert len(table_state(pair[1])) > 20


def test_both_appliers_follow_the_same_incremental_syncs(pair) -> None:
    rng = random.Random(11)
    store, states = Store(), {4: plan.Programmed(), 6: plan.Programmed()}
    builders = {4: RulesetBuilder(SETTINGS, 4), 6: RulesetBuilder(SETTINGS, 6)}
    tables = 0  # transactions that programmed a balancing table's slots
    for step in range(12):
        for origin in rng.sample(["f1", "f2", "f3"], rng.randrange(1, 3)):
            parsed, _ = parse_objects(_random_world(rng, rng.randrange(0, 6)), origin)
            store.replace(origin, parsed)
        tx, changes = Transaction(), {}
        for version, builder in builders.items():
            family_tx, changes[version] = states[version].plan(builder.build(store.snapshot(), ["192.168.50.1"]))
            tx.extend(family_tx.commands)
        apply_both(pair, tx)
        tables += any(getattr(op.subject, "container", "").startswith("slots-") for op in tx)
        for version in builders:
            states[version] = states[version].commit(changes[version])
        assert_same_tables(pair, ("ip",))
    assert tables >= 3, "the random worlds had too few table-balanced Services to test them"


def _random_world(rng: random.Random, services: int) -> list[dict]:
    """Services of every kind and policy, endpoints spread over this node and another."""
    docs = []
    for i in rng.sample(range(40), services):
        kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
        protocol = rng.choice(["TCP", "UDP"])
        spec = {
            "clusterIP": f"10.96.0.{i + 1}", "type": kind,
            "externalTrafficPolicy": rng.choice(["Cluster", "Local"]),
            "internalTrafficPolicy": rng.choice(["Cluster", "Local"]),
            "ports": [{"name": "p", "port": 80, "protocol": protocol, "nodePort": 30000 + i}],
        }
        service = {"kind": "Service", "metadata": {"name": f"s{i}", "namespace": "default"}, "spec": spec}
        balance = rng.random()
        if balance < 0.25:  # balanced by a kernel table (nat/tables.py): jhash and mark-map lookups
            service["metadata"]["annotations"] = {"dataplane.io/lb-algorithm": "maglev",
                                                  "dataplane.io/lb-table-size": rng.choice(["7", "13"])}
        elif balance < 0.35:
            service["metadata"]["annotations"] = {"dataplane.io/weights": "10.244.0.1=3,10.244.1.2=0",
                                                  "dataplane.io/lb-table-size": "11"}
        if rng.random() < 0.15:
            spec["sessionAffinity"] = "ClientIP"
        if rng.random() < 0.3:
            spec["externalIPs"] = [f"203.0.113.{i + 1}"]
        if kind == "LoadBalancer":
            service["status"] = {"loadBalancer": {"ingress": [{"ip": f"198.51.100.{i + 1}"}]}}
            if rng.random() < 0.5:
                spec["loadBalancerSourceRanges"] = rng.choice([["10.0.0.0/8"], ["192.168.50.0/24", "172.16.0.1/32"]])
        docs.append(service)
        docs.append({
            "kind": "EndpointSlice",
            "metadata": {"name": f"s{i}-x", "namespace": "default", "labels": {"kubernetes.io/service-name": f"s{i}"}},
            "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
            "endpoints": [{"addresses": [f"10.244.{rng.randrange(3)}.{rng.randrange(1, 6)}"],
                           "nodeName": rng.choice(["node-a", "node-b"]),
                           "conditions": rng.choice([{"ready": True}, {"ready": False, "serving": True, "terminating": True}])}
                          for _ in range(rng.randrange(0, 4))],
        })
    return docs


def test_incremental_syncs_converge_to_the_full_ruleset(nft: Nftables) -> None:
    rng = random.Random(7)
    store, builder, state = Store(), RulesetBuilder(SETTINGS), plan.Programmed()
    partial = tables = 0
    for step in range(20):
        for origin in rng.sample(["f1", "f2", "f3"], rng.randrange(1, 3)):
            parsed, _ = parse_objects(_random_world(rng, rng.randrange(0, 6)), origin)
            store.replace(origin, parsed)
        node_ips = rng.choice([["192.168.50.1"], ["192.168.50.1", "192.168.60.1"]])
        transaction, change = state.plan(builder.build(store.snapshot(), node_ips))
        nft.apply(transaction)
        state = state.commit(change)
        tables += any(getattr(op.subject, "container", "").startswith("slots-") for op in transaction)
        partial += not str(transaction).startswith("add table")
        incremental = table_state(nft)
        nft.apply(plan.full(RulesetBuilder(SETTINGS).build(store.snapshot(), node_ips))[0])
        assert incremental == table_state(nft), f"step {step} diverged from a full sync"
    assert partial >= 18  # the steps after the first were incremental
    assert tables >= 5  # balancing tables were programmed, and changed
    assert nft.fallbacks == 0


def test_the_netlink_applier_programs_the_namespace_its_nft_command_runs_in() -> None:
    """Without `netns`, an nft command wrapped in `ip netns exec NAME` names the namespace the batches go
    to: they once reached the test process's own, and the namespace under test stayed empty (the
    balancing tables "applied", 0 flows dnated). Read back through that namespace's nft."""
    name = f"dp-nft-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    table = f"dp-where-{uuid.uuid4().hex[:8]}"  # unique: a leak would be found, and removed, by name
    try:
        nft = Nftables(NftCommand(["ip", "netns", "exec", name, "nft"]))
        assert nft.applier == "netlink"
        nft.apply(Transaction([Operation("add", Table("ip", table)), Operation("add", Table("ip", table), Chain("c"))]))
        assert nft.fallbacks == 0
        assert _list_json(nft, "ip", table) != '{"nftables": []}'
        with pytest.raises(ValueError, match="one namespace"):
            Nftables(NftCommand(["ip", "netns", "exec", name, "nft"]), netns="elsewhere")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        leaked = subprocess.run(["nft", "list", "table", "ip", table], capture_output=True).returncode == 0
        if leaked:  # undo what this test wrote where no test may write, then fail
            subprocess.run(["nft", "delete", "table", "ip", table], check=False)
    assert not leaked, "the netlink batch went to this process's namespace"


def _kernel_dump(nft: Nftables) -> list[str]:
    """The namespace's ruleset as the kernel dumps it (`nft --debug=netlink`: rule expressions and raw
    set elements, anonymous sets included), each set's elements sorted: hash order is not ours.
    Not `nft list`: nft 1.0.6 misprints some of what these tables hold, and the kernel's bytes are
    what packets meet."""
    done = subprocess.run(nft._backend._argv + ["--debug=netlink", "list", "ruleset"], capture_output=True,
                          text=True, check=True)
    blocks: list[tuple[str, list[str]]] = []
    for line in done.stdout.splitlines():
        if line.startswith("table "):  # nft's own listing follows the dump: the same state again
            break
        if not line.startswith(("\t", " ")):
            blocks.append((line, []))
        elif blocks:
            blocks[-1][1].append(line)
    return [head + "\n" + "\n".join(sorted(body) if "@" in head else body) for head, body in blocks]


def _table_world(endpoints: list[str]) -> list[dict]:
    """One Maglev NodePort Service with ClientIP affinity, at its default size (16381 slots for 10
    endpoints): a named slot map and an anonymous jhash vmap of 16381 elements, both split across
    many messages; and a weighted one, weight 0 draining an endpoint."""
    docs = []
    for name, ip, node_port, annotations in (
            ("maglev", "10.96.7.1", 30701, {"dataplane.io/lb-algorithm": "maglev"}),
            ("weighted", "10.96.7.2", 30702, {"dataplane.io/weights": f"{endpoints[0]}=3,{endpoints[1]}=0"})):
        svc = service(name, ip, [port("udp", 53, 8080, "UDP", node_port=node_port)], type="NodePort",
                      sessionAffinity="ClientIP" if name == "maglev" else "None")
        svc["metadata"]["annotations"] = annotations
        docs += [svc, endpoint_slice(name, endpoints, [("udp", 8080, "UDP")], node="node-a")]
    return docs


def test_both_appliers_leave_the_same_kernel_state_for_full_size_balancing_tables(pair) -> None:
    """Full-size tables, then an endpoint leaving and one joining (element deletes and adds, the
    affinity vmap's rule replaced): the kernel holds the same expressions and elements either way."""
    endpoints = [f"10.244.1.{i}" for i in range(1, 11)]
    store, builder, state = Store(), RulesetBuilder(SETTINGS), plan.Programmed()
    for step, current in enumerate((endpoints, endpoints[:3] + endpoints[4:], endpoints + ["10.244.1.99"])):
        store.replace("tables", parse_objects(_table_world(current), "tables")[0])
        tx, change = state.plan(builder.build(store.snapshot(), ["192.168.50.1"]))
        apply_both(pair, tx)
        state = state.commit(change)
        text, netlink = (_kernel_dump(nft) for nft in pair)
        assert netlink == text, f"step {step}: the kernel holds something else"
        assert any("jhash" in block and "mod 16381" in block for block in netlink)
        assert any(block.startswith("ip dataplane @__map") and block.count("element") >= 16381 for block in netlink)


def _refusals() -> dict[str, tuple[Operation, int]]:
    table = Table("ip", "dataplane")
    return {
        "goto a missing chain": (
            Operation("add", table, AddRule(layout.SERVICES, Rule.of(Verdict("goto", "no-such-chain")))), errno.ENOENT),
        "delete a chain still jumped to": (Operation("delete", table, Chain(layout.SERVICES)), errno.EBUSY),
        "a set declared again with another type": (
            Operation("add", table, Container(layout.CLUSTER_IPS, ("inet_service",), kind="set")), errno.EEXIST),
        "a base chain moved to another hook": (
            Operation("add", table, Chain("nat-prerouting", base=BaseChain("nat", "output", -100))), errno.EOPNOTSUPP),
    }


@pytest.mark.parametrize("refusal", sorted(_refusals()))
def test_refused_transaction_changes_nothing(nft: Nftables, refusal: str) -> None:
    store = Store()
    parsed, _ = parse_objects(_random_world(random.Random(1), 5))
    store.replace("f", parsed)
    nft.apply(plan.full(RulesetBuilder(SETTINGS).build(store.snapshot(), ["192.168.50.1"]))[0])
    before = table_state(nft)
    operation, code = _refusals()[refusal]
    broken = plan.full(RulesetBuilder(SETTINGS).build(Store().snapshot(), []))[0]
    broken.add(operation)
    with pytest.raises(NftError) as error:
        nft.apply(broken)
    assert error.value.errno == code, str(error.value)
    assert table_state(nft) == before
    assert nft.fallbacks == 0


def test_other_tables_survive_syncs(nft: Nftables) -> None:
    nft.run("add table inet other\nadd chain inet other c { type filter hook input priority 0 ; }\nadd rule inet other c counter\n")
    other = table_state(nft, "inet", "other")
    store, builder, state = Store(), RulesetBuilder(SETTINGS), plan.Programmed()
    for seed in range(3):
        parsed, _ = parse_objects(_random_world(random.Random(seed), 4))
        store.replace("f", parsed)
        transaction, change = state.plan(builder.build(store.snapshot(), ["192.168.50.1"]))
        nft.apply(transaction)
        state = state.commit(change)
    nft.apply(plan.full(builder.build(store.snapshot(), ["192.168.50.1"]))[0])
    assert table_state(nft, "inet", "other") == other


def test_in_place_full_sync_keeps_affinity_and_converges(nft: Nftables) -> None:
    store, builder = Store(), RulesetBuilder(SETTINGS)
    sticky = {
        "kind": "Service", "metadata": {"name": "sticky", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.99", "sessionAffinity": "ClientIP",
                 "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]},
    }
    world = _random_world(random.Random(3), 6) + [sticky, {
        "kind": "EndpointSlice",
        "metadata": {"name": "sticky-x", "namespace": "default", "labels": {"kubernetes.io/service-name": "sticky"}},
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.7"], "nodeName": "node-a"}],
    }]
    parsed, _ = parse_objects(world)
    store.replace("f", parsed)
    nft.apply(plan.full(builder.build(store.snapshot(), ["192.168.50.1"]))[0])
    clients = next(name for kind, name in nft_objects(nft) if "clients" in name)
    nft.run(f'add element ip dataplane {clients} {{ 192.168.50.2 }}\n')
    parsed, _ = parse_objects(_random_world(random.Random(4), 6) + world[-2:])
    store.replace("f", parsed)
    snapshot = store.snapshot()
    nft.apply(plan.full(builder.build(snapshot, ["192.168.50.1"]), nft_objects(nft))[0])
    assert "192.168.50.2" in nft.run(f'list set ip dataplane {clients}\n')
    in_place = table_state(nft)
    nft.apply(plan.full(RulesetBuilder(SETTINGS).build(snapshot, ["192.168.50.1"]))[0])
    replaced = table_state(nft)

    def without_clients(state: list[str]) -> list[str]:
        return [entry for entry in state if clients not in entry]

    assert without_clients(in_place) == without_clients(replaced)
    assert len(in_place) == len(replaced)
    assert nft.fallbacks == 0


def nft_objects(nft: Nftables) -> list[tuple[str, str]]:
    listing = json.loads(_list_json(nft, "ip", "dataplane"))
    return [(kind, item[kind]["name"]) for item in listing["nftables"] for kind in ("chain", "map", "set")
            if kind in item]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv is not installed")
def test_a_batch_without_cap_net_admin_is_refused_with_eperm(pair) -> None:
    """The netlink applier as nobody in the namespace: the kernel refuses the batch itself."""
    namespace = pair[0]._backend._argv[3]
    script = (
        "from dataplane.nat.nftables import Nftables, NftCommand, NftError\n"
        "from dataplane.nat.ruleset import Operation, Table, Transaction\n"
        "nft = Nftables(NftCommand(['nft']), applier='netlink')\n"
        "try:\n"
        "    nft.apply(Transaction([Operation('add', Table('ip', 'dataplane'))]))\n"
        "except NftError as error:\n"
        "    print(error.errno, nft.fallbacks)\n"
    )
    done = subprocess.run(["ip", "netns", "exec", namespace, "setpriv", "--reuid=65534", "--regid=65534",
                           "--clear-groups", sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.split() == [str(errno.EPERM), "0"], done.stderr
    assert table_state(pair[0]) == []


def test_objects_are_listed_over_netlink_as_nft_lists_them(nft: Nftables) -> None:
    """Names only, without reading a rule or element: what an in-place full sync needs, as nft -j -t gives it
    (anonymous sets left out; chains of other tables with the same names too)."""
    assert nft.list_objects("ip", "dataplane") == []
    nft.run("add table ip other\nadd chain ip other services\nadd set ip other cluster-ips { type ipv4_addr ; }\n")
    store, builder = Store(), RulesetBuilder(SETTINGS)
    parsed, _ = parse_objects(_random_world(random.Random(5), 8))
    store.replace("f", parsed)
    nft.apply(plan.full(builder.build(store.snapshot(), ["192.168.50.1"]))[0])
    nft.run("add chain ip dataplane extra\nadd rule ip dataplane extra ip daddr { 10.0.0.1, 10.0.0.2 } accept\n")
    listed = nft.list_objects("ip", "dataplane")
    assert sorted(listed) == sorted(nft_objects(nft)) and ("chain", "extra") in listed
    assert {kind for kind, _ in listed} == {"chain", "map", "set"}


def test_the_generation_moves_on_by_one_with_every_commit_of_anyones(nft: Nftables) -> None:
    start = nft.generation()
    assert isinstance(start, int) and start > 0
    nft.apply(Transaction([Operation("add", Table("ip", "dataplane"))]))
    assert nft.generation() == start + 1
    nft.run("add table inet other\n")  # another table's, through nft: counted all the same
    assert nft.generation() == start + 2
    nft.run("add table ip x\n", check_only=True)  # checked, not committed
    nft.probe()
    assert nft.generation() == start + 2
    with pytest.raises(NftError):
        nft.run("add chain ip dataplane c\nadd rule ip dataplane missing accept\n")
    assert nft.generation() == start + 2  # a refused batch commits nothing


def test_a_resync_with_nothing_changed_sends_nothing_until_someone_commits(nft: Nftables) -> None:
    """The proxier against the kernel: the generation vouches for the tables between our own commits."""
    from dataplane.daemon.proxier import Proxier

    proxier = Proxier(SETTINGS, nft, families=(4,))
    store = Store()
    parsed, _ = parse_objects(_random_world(random.Random(6), 8))
    store.replace("f", parsed)
    proxier.sync(store.snapshot(), ("192.168.50.1",), full=True)
    healthy = table_state(nft)
    generation = nft.generation()
    assert proxier.sync(store.snapshot(), ("192.168.50.1",), full=True).verified
    assert nft.generation() == generation
    nft.run("flush map ip dataplane service-ips\n")
    result = proxier.sync(store.snapshot(), ("192.168.50.1",), full=True)
    assert not result.verified and result.commands > 0 and table_state(nft) == healthy
    assert proxier.sync(store.snapshot(), ("192.168.50.1",), full=True).verified
