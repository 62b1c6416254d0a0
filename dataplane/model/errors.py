"""Errors raised while turning Kubernetes objects into model values.

Every error names where the bad value came from (file, object, field), so an
operator can fix the manifest without reading our code.
"""

from __future__ import annotations


class InvalidObject(ValueError):
    """A Kubernetes object that cannot be used, or a field of it that is ignored; the message names the field.

    `skipped` is True when the whole object is left out, False when only the
    field is ignored (a bad `dataplane.io/*` annotation: its default applies)
    or the object lost an address or port to another (see model/claims.py).
    Either way it is reported and counted as an invalid object.
    """

    def __init__(self, kind: str, ref: str, field: str, problem: str, source: str = "", skipped: bool = True):
        self.kind = kind
        self.ref = ref
        self.field = field
        self.problem = problem
        self.source = source
        self.skipped = skipped
        super().__init__(str(self))

    def with_source(self, source: str) -> "InvalidObject":
        return InvalidObject(self.kind, self.ref, self.field, self.problem, source, self.skipped)

    def kept(self) -> "InvalidObject":
        """The same problem, for an object that is still used without the field."""
        return InvalidObject(self.kind, self.ref, self.field, self.problem, self.source, skipped=False)

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.kind} {self.ref}: {self.field}: {self.problem}"
