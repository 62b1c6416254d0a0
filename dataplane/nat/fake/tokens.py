"""nft script text as tokens: commands split where nft splits them, every token with its line and column.

A newline or `;` outside braces ends a command; errors are worded and
located as nft locates them (`/dev/stdin:LINE:COL-COL: Error: ...`, the
line, a caret under the culprit).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ..nftables import NftError


class Token(NamedTuple):
    text: str
    line: int
    col: int  # 1-based
    start: int  # offset in the script
    end: int


_SCAN = re.compile(r'(?P<nl>\n)|(?P<ws>[ \t\r]+)|(?P<hash>#[^\n]*)|(?P<str>"[^"\n]*")|(?P<punct>[{},;])'
                   r'|(?P<word>[^\s{},;"#]+)')


def located(script: str, line: int, col: int, length: int, message: str) -> NftError:
    lines = script.split("\n")
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    length = max(1, length)
    where = f"/dev/stdin:{line}:{col}-{col + length - 1}"
    return NftError(f"{where}: Error: {message}\n{text}\n{' ' * (col - 1)}{'^' * length}", script)


def tokenize(script: str) -> list[list[Token]]:
    """Commands, each a list of tokens: a newline or `;` outside braces ends one."""
    commands: list[list[Token]] = []
    current: list[Token] = []
    opened: list[Token] = []
    pos, line, line_start = 0, 1, 0
    while pos < len(script):
        match = _SCAN.match(script, pos)
        if match is None:
            col = pos - line_start + 1
            what = "unterminated string" if script[pos] == '"' else f"unexpected character {script[pos]!r}"
            raise located(script, line, col, 1, f"syntax error, {what}")
        kind = match.lastgroup
        if kind == "nl":
            if not opened and current:
                commands.append(current)
                current = []
            line, line_start = line + 1, match.end()
        elif kind not in ("ws", "hash"):
            token = Token(match.group(), line, pos - line_start + 1, pos, match.end())
            if token.text == "{":
                opened.append(token)
            elif token.text == "}":
                if not opened:
                    raise located(script, line, token.col, 1, "syntax error, unexpected '}'")
                opened.pop()
            if token.text == ";" and not opened:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        pos = match.end()
    if opened:
        token = opened[-1]
        raise located(script, token.line, token.col, 1, "syntax error, '{' is never closed")
    if current:
        commands.append(current)
    return commands


class Cursor:
    def __init__(self, tokens: list[Token], script: str):
        self.tokens = tokens
        self.i = 0
        self.script = script

    def peek(self, ahead: int = 0) -> str | None:
        index = self.i + ahead
        return self.tokens[index].text if index < len(self.tokens) else None

    def at_end(self) -> bool:
        return self.i >= len(self.tokens)

    def last(self) -> Token:
        return self.tokens[min(self.i, len(self.tokens)) - 1]

    def next(self, expecting: str) -> Token:
        if self.at_end():
            last = self.tokens[-1]
            raise located(self.script, last.line, last.col + len(last.text), 1,
                           f"syntax error, unexpected end of command, expecting {expecting}")
        token = self.tokens[self.i]
        self.i += 1
        return token

    def take(self, *choices: str) -> Token:
        token = self.next(" or ".join(choices))
        if token.text not in choices:
            raise self.error(f"syntax error, unexpected {token.text!r}, expecting {' or '.join(choices)}", token)
        return token

    def word(self, expecting: str) -> Token:
        token = self.next(expecting)
        if token.text in "{},;" or token.text.startswith('"'):
            raise self.error(f"syntax error, unexpected {token.text!r}, expecting {expecting}", token)
        return token

    def accept(self, text: str) -> bool:
        if self.peek() == text:
            self.i += 1
            return True
        return False

    def error(self, message: str, token: Token | None = None) -> NftError:
        token = token or (self.tokens[self.i] if not self.at_end() else self.tokens[-1])
        return located(self.script, token.line, token.col, len(token.text), message)

    def finish(self) -> None:
        if not self.at_end():
            token = self.tokens[self.i]
            raise self.error(f"syntax error, unexpected {token.text!r}", token)

    def text(self, start: Token, end: Token) -> str:
        return " ".join(self.script[start.start:end.end].split())
