"""canonical_ip: the one place untrusted address text becomes nft text."""

import pytest

from dataplane.model.fields import canonical_ip


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.1", "10.0.0.1"),
        ("FD00:0:0::1", "fd00::1"),
        ("010.0.0.1", None),  # leading zeros are ambiguous (octal?): refused, as Kubernetes does
        ("10.0.0", None),
        ("10.0.0.1 ", None),
        ("fe80::1%eth0", None),  # a zone would reach nft as text
        ("10.0.0.1; flush ruleset", None),
        ("", None),
    ],
)
def test_canonical_ip(text: str, expected: str | None) -> None:
    assert canonical_ip(text) == expected
