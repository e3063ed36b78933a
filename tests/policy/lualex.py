"""A Lua 5.4 tokenizer for the tests, written from the reference manual (section 3.1) and llex.c.

It tells comments and string literals from code exactly as Lua's own lexer
does (short comments end at \\n or \\r; ``--[[`` and ``--[==[`` open long
ones; short strings take backslash escapes, long strings end at their own
bracket), which is what a test needs to show that text from YAML stayed
inside a comment or a string.  Numbers and operators are tokenized well
enough to compare two programs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LONG_OPEN = re.compile(r"\[(=*)\[")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"0[xX](?:[0-9a-fA-F]*\.?[0-9a-fA-F]*)(?:[pP][+-]?[0-9]+)?|"
                     r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OPS = ("...", "..", "==", "~=", "<=", ">=", "<<", ">>", "//", "::")
_SPACE = " \t\f\v"


class LexError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    kind: str  # name | number | string | op | comment
    text: str  # as written in the source
    line: int


def tokens(src: str) -> list[Token]:
    out: list[Token] = []
    i, n, line = 0, len(src), 1

    def newlines(text: str) -> int:
        # \n, \r, \r\n and \n\r each count once, as in llex.c's inclinenumber
        return len(re.findall(r"\r\n|\n\r|\n|\r", text))

    def long_bracket(at: int) -> int | None:
        """The end (exclusive) of a long bracket opened at src[at], or None if none opens there."""
        m = _LONG_OPEN.match(src, at)
        if m is None:
            return None
        close = "]" + m.group(1) + "]"
        end = src.find(close, m.end())
        if end < 0:
            raise LexError(f"line {line}: unfinished long bracket")
        return end + len(close)

    while i < n:
        c = src[i]
        if c in "\r\n":
            j = i + 2 if src[i:i + 2] in ("\r\n", "\n\r") else i + 1
            line += 1
            i = j
        elif c in _SPACE:
            i += 1
        elif src.startswith("--", i):
            end = long_bracket(i + 2)
            if end is None:  # a short comment: to the end of the line
                end = i + 2
                while end < n and src[end] not in "\r\n":
                    end += 1
            text = src[i:end]
            out.append(Token("comment", text, line))
            line += newlines(text)
            i = end
        elif c == "[" and (end := long_bracket(i)) is not None:
            text = src[i:end]
            out.append(Token("string", text, line))
            line += newlines(text)
            i = end
        elif c in "\"'":
            j = i + 1
            while True:
                if j >= n or src[j] in "\r\n":
                    raise LexError(f"line {line}: unfinished string")
                if src[j] == "\\":
                    j += 2  # the escaped character, which may be a newline
                    continue
                if src[j] == c:
                    break
                j += 1
            text = src[i:j + 1]
            out.append(Token("string", text, line))
            line += newlines(text)
            i = j + 1
        elif c.isdigit() or (c == "." and i + 1 < n and src[i + 1].isdigit()):
            m = _NUMBER.match(src, i)
            assert m is not None
            out.append(Token("number", m.group(), line))
            i = m.end()
        elif (m := _NAME.match(src, i)) is not None:
            out.append(Token("name", m.group(), line))
            i = m.end()
        else:
            op = next((o for o in _OPS if src.startswith(o, i)), c)
            if op not in _OPS and op not in "+-*/%^#&~|<>=(){}[];:,.":
                raise LexError(f"line {line}: unexpected symbol {op!r}")
            out.append(Token("op", op, line))
            i += len(op)
    return out


def code(src: str) -> list[str]:
    """The program's tokens without its comments, each string literal as <string>: what it does."""
    return ["<string>" if t.kind == "string" else t.text for t in tokens(src) if t.kind != "comment"]


def comments(src: str) -> list[Token]:
    return [t for t in tokens(src) if t.kind == "comment"]
