"""Errors raised while turning Kubernetes objects into model values.

Every error names where the bad value came from (file, object, field), so an
operator can fix the manifest without reading our code.
"""

from __future__ import annotations


class InvalidObject(ValueError):
    """A Kubernetes object that cannot be used; the message names the field."""

    def __init__(self, kind: str, ref: str, field: str, problem: str, source: str = ""):
        self.kind = kind
        self.ref = ref
        self.field = field
        self.problem = problem
        self.source = source
        super().__init__(str(self))

    def with_source(self, source: str) -> "InvalidObject":
        return InvalidObject(self.kind, self.ref, self.field, self.problem, source)

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.kind} {self.ref}: {self.field}: {self.problem}"
