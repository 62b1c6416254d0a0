"""The kernel's refusals, worded as nft words them, and where in a command they point."""

from __future__ import annotations

ENOENT = "No such file or directory"
EEXIST = "File exists"
EBUSY = "Device or resource busy"
EOPNOTSUPP = "Operation not supported"
EMLINK = "Too many links"  # a jump loop, or chains nested deeper than the jump stack
JUMP_STACK = 16  # the kernel's NFT_JUMP_STACK_SIZE

NAME = "name"  # Failed.where: the object's name, rather than the whole command


class Failed(Exception):
    """A command the kernel would refuse.

    `where` says which part of the command it points at: None (the command),
    NAME, or an element's index in an element command. The front end turns it
    into nft's message: a line and column for a script, the command for a
    typed operation.
    """

    def __init__(self, message: str, where: int | str | None = None):
        super().__init__(message)
        self.where = where


class Invalid(ValueError):
    """A literal that is not a value of its type."""
