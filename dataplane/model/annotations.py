"""`dataplane.io/*` annotations on a Service: parsed once, with the Service, and reported like fields.

Annotations are untrusted input. A bad one is an InvalidObject naming the
Service and the field (`metadata.annotations[dataplane.io/weights]`), with
its value and why; it is reported once per change and counted, the Service
is still used and the annotation's default applies (`InvalidObject.skipped`
is False).

- `dataplane.io/lb-algorithm`: random | round-robin | maglev | least-conn
  (unset: the daemon's --lb-algorithm);
- `dataplane.io/weights`: comma-separated `KEY=WEIGHT`, KEY an endpoint IP,
  `node:NAME` or `zone:NAME`; WEIGHT an integer 0-1000. Bad items are left
  out, the others apply.
Any other `dataplane.io/` key is reported too: a typo must not pass silently.
"""

from __future__ import annotations

import ipaddress

from .errors import InvalidObject
from .fields import Reader

PREFIX = "dataplane.io/"
ALGORITHM_ANNOTATION = "dataplane.io/lb-algorithm"
WEIGHTS_ANNOTATION = "dataplane.io/weights"
ALGORITHMS = ("random", "round-robin", "maglev", "least-conn")
MAX_WEIGHT = 1000
TABLE_SIZE_ANNOTATION = "dataplane.io/lb-table-size"  # read by lb/tables.py, where its problems are reported
KNOWN = (ALGORITHM_ANNOTATION, WEIGHTS_ANNOTATION, TABLE_SIZE_ANNOTATION)


def weight_items(text: str) -> tuple[dict[str, int], list[str]]:
    """`10.0.0.1=3, node:n1=2, zone:a=1` -> ({'10.0.0.1': 3, 'node:n1': 2, 'zone:a': 1}, the bad items)."""
    rules: dict[str, int] = {}
    bad: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.rpartition("=")
        key = key.strip()
        try:
            weight = int(value)
            if not sep or not 0 <= weight <= MAX_WEIGHT:
                raise ValueError
            if key.startswith(("node:", "zone:")):
                if not key[5:]:
                    raise ValueError
            else:
                key = str(ipaddress.ip_address(key))
        except ValueError:
            bad.append(item)
            continue
        rules[key] = weight
    return rules, bad


def read_annotations(meta: Reader, annotations: dict[str, str]) -> tuple[str, tuple[tuple[str, int], ...],
                                                                           list[InvalidObject]]:
    """(lb algorithm or "", weights, problems) from a Service's annotations; never raises."""
    problems: list[InvalidObject] = []

    def problem(key: str, text: str) -> None:
        shown = key if key.isprintable() else key.encode("unicode_escape").decode("ascii")
        problems.append(meta.fail(text, f"annotations[{shown[:100]}]").kept())

    algorithm = annotations.get(ALGORITHM_ANNOTATION, "").strip()
    if algorithm and algorithm not in ALGORITHMS:
        problem(ALGORITHM_ANNOTATION, f"must be one of {', '.join(ALGORITHMS)}, got {_short(algorithm)}; "
                                      "the daemon's --lb-algorithm applies")
        algorithm = ""
    rules, bad = weight_items(annotations.get(WEIGHTS_ANNOTATION, ""))
    if bad:
        problem(WEIGHTS_ANNOTATION, f"items must be IP=N, node:NAME=N or zone:NAME=N with N in 0..{MAX_WEIGHT}, "
                                    f"got {', '.join(_short(item) for item in bad[:5])}"
                                    f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}; those are ignored")
    for key in sorted(annotations):
        if key.startswith(PREFIX) and key not in KNOWN:
            problem(key, f"is not an annotation dataplane reads ({', '.join(KNOWN)}); ignored")
    return algorithm, tuple(sorted(rules.items())), problems


def _short(text: str) -> str:
    """A value for a message: quoted, escaped onto one line, at most 80 characters."""
    return repr(text[:80]) + ("..." if len(text) > 80 else "")
