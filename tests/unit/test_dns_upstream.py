"""Upstream resolvers: parsing, resolv.conf, and never forwarding to ourselves.

Address plan: this node 192.168.1.10 (and loopback); other resolvers 192.168.1.53, 10.0.0.2, fd00::53.
"""

from __future__ import annotations

import pytest

from dataplane.dns.upstream import Upstream, from_resolv_conf, is_local_address, parse_address, parse_list, without_self


@pytest.mark.parametrize("text, expected", [
    ("192.168.1.53", Upstream("192.168.1.53", 53)),
    (" 192.168.1.53:5353 ", Upstream("192.168.1.53", 5353)),
    ("fd00::53", Upstream("fd00::53", 53)),
    ("[fd00::53]", Upstream("fd00::53", 53)),
    ("[fd00::53]:5353", Upstream("fd00::53", 5353)),
    ("[FD00:0::53]:53", Upstream("fd00::53", 53)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text, message", [
    ("resolver.example", "not an IP address"),
    ("192.168.1.53:", "no valid port"),
    ("192.168.1.53:0", "no valid port"),
    ("192.168.1.53:70000", "no valid port"),
    ("[fd00::53", "not an address"),
    ("[fd00::53]x", "not an address"),
])
def test_parse_address_names_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=f"--dns-upstream: .*{message}"):
        parse_address(text)


def test_parse_list():
    assert parse_list("192.168.1.53, 10.0.0.2:5353,") == [Upstream("192.168.1.53"), Upstream("10.0.0.2", 5353)]
    assert parse_list("") == []


def test_resolv_conf():
    text = """
# generated
search default.svc.cluster.local svc.cluster.local
nameserver 192.168.1.53   # primary
nameserver fe80::1%eth0
nameserver not-an-address
options ndots:5
;nameserver 10.9.9.9
nameserver 10.0.0.2
"""
    assert from_resolv_conf(text) == [Upstream("192.168.1.53"), Upstream("fe80::1"), Upstream("10.0.0.2")]


LOCAL = {"192.168.1.10", "127.0.0.1", "::1"}


@pytest.mark.parametrize("bind, upstream, is_self", [
    ("192.168.1.10:53", "192.168.1.10:53", True),
    ("192.168.1.10:53", "192.168.1.10:5353", False),
    ("192.168.1.10:53", "127.0.0.1:53", False),  # another server on loopback
    ("127.0.0.1:53", "127.0.0.1:53", True),
    ("0.0.0.0:53", "127.0.0.1:53", True),
    ("0.0.0.0:53", "127.0.0.53:53", True),  # all of 127/8 is this host
    ("0.0.0.0:53", "192.168.1.10:53", True),
    ("0.0.0.0:53", "0.0.0.0:53", True),
    ("0.0.0.0:53", "192.168.1.53:53", False),
    ("0.0.0.0:53", "::1:53", False),  # parsed as IPv6 ::1:53 on port 53; we do not listen on IPv6
    ("[::]:53", "192.168.1.10:53", True),  # an IPv6 wildcard socket also receives IPv4
    ("[::]:53", "[::1]:53", True),
    ("[::]:53", "[fd00::53]:53", False),
])
def test_without_self(bind, upstream, is_self):
    usable, skipped = without_self([parse_address(upstream)], parse_address(bind), LOCAL.__contains__)
    assert (skipped, usable) == (([parse_address(upstream)], []) if is_self else ([], [parse_address(upstream)]))


def test_is_local_address():
    assert is_local_address("127.0.0.1")
    assert not is_local_address("192.0.2.1")  # TEST-NET-1: never assigned here
