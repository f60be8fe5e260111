"""Kubernetes label selectors in their string form (``?labelSelector=``).

``list`` and ``watch`` take a selector such as ``app=cdi,tier!=db`` or
``env in (prod,staging),!canary``.  The Kubernetes API parses these on the
server, so the embedded store must too, with the same grammar:

- ``key=value`` and ``key==value``: the label is present with that value;
- ``key!=value``: absent, or present with another value;
- ``key``: present (any value); ``!key``: absent;
- ``key in (v1,v2)``: present with one of the values;
  ``key notin (v1,v2)``: absent, or present with none of them;
- requirements separated by commas must all hold; the empty selector
  matches everything.

Keys and values are checked as Kubernetes checks label keys and values
(optional DNS-subdomain prefix, 63-character names), so a selector the real
API server would refuse is refused here too, with ``BadRequest`` naming the
problem.  The set-based integer operators ``<`` and ``>`` are not supported.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping

from cdi.api.errors import BadRequest

_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_OPERATORS = ("!=", "==", "=", "!", "(", ")", ",")
_SPECIAL = frozenset(" \t\r\n,()=!<>")


class Op(enum.Enum):
    EQUALS = "="
    NOT_EQUALS = "!="
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"
    IN = "in"
    NOT_IN = "notin"


@dataclasses.dataclass(frozen=True)
class Requirement:
    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op is Op.EXISTS:
            return present
        if self.op is Op.DOES_NOT_EXIST:
            return not present
        if self.op in (Op.EQUALS, Op.IN):
            return present and labels[self.key] in self.values
        # NOT_EQUALS, NOT_IN: an absent label matches, as in Kubernetes.
        return not present or labels[self.key] not in self.values


@dataclasses.dataclass(frozen=True)
class Selector:
    """A parsed selector: the AND of its requirements."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


EVERYTHING = Selector()


def parse(text: str | None) -> Selector:
    """Parse a selector string; ``None`` and ``""`` select everything.

    Raises ``BadRequest`` for invalid syntax or an invalid key or value.
    """
    if not text or not text.strip():
        return EVERYTHING
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.lexemes = self._lex(text)
        self.pos = 0

    def error(self, reason: str) -> BadRequest:
        return BadRequest(f"invalid label selector {self.text!r}: {reason}")

    def _lex(self, text: str) -> list[str]:
        lexemes: list[str] = []
        i = 0
        while i < len(text):
            c = text[i]
            if c.isspace():
                i += 1
                continue
            if c in "<>":
                raise self.error(f"unsupported operator {c!r}")
            op = next((o for o in _OPERATORS if text.startswith(o, i)), None)
            if op is not None:
                lexemes.append(op)
                i += len(op)
                continue
            start = i
            while i < len(text) and text[i] not in _SPECIAL:
                i += 1
            lexemes.append(text[start:i])
        return lexemes

    def peek(self) -> str | None:
        return self.lexemes[self.pos] if self.pos < len(self.lexemes) else None

    def take(self) -> str | None:
        lexeme = self.peek()
        self.pos += 1
        return lexeme

    def parse(self) -> Selector:
        requirements = [self.requirement()]
        while self.peek() is not None:
            if self.take() != ",":
                raise self.error(f"expected ',' after {_describe(requirements[-1])}")
            requirements.append(self.requirement())
        return Selector(tuple(requirements))

    def requirement(self) -> Requirement:
        if self.peek() == "!":
            self.take()
            key = self.key()
            if self.peek() not in (None, ","):
                raise self.error(f"unexpected {self.peek()!r} after '!{key}'")
            return Requirement(key, Op.DOES_NOT_EXIST)
        key = self.key()
        lexeme = self.peek()
        if lexeme in (None, ","):
            return Requirement(key, Op.EXISTS)
        self.take()
        if lexeme in ("=", "=="):
            return Requirement(key, Op.EQUALS, frozenset([self.value()]))
        if lexeme == "!=":
            return Requirement(key, Op.NOT_EQUALS, frozenset([self.value()]))
        if lexeme == "in":
            return Requirement(key, Op.IN, self.value_set("in"))
        if lexeme == "notin":
            return Requirement(key, Op.NOT_IN, self.value_set("notin"))
        raise self.error(f"unknown operator {lexeme!r} after key {key!r}")

    def key(self) -> str:
        lexeme = self.take()
        if lexeme is None or lexeme in _OPERATORS:
            raise self.error("expected a label key" + (f", found {lexeme!r}" if lexeme else ""))
        prefix, slash, name = lexeme.rpartition("/")
        if slash and not (prefix and len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix)):
            raise self.error(f"invalid label key {lexeme!r}: bad prefix {prefix!r}")
        if not name or len(name) > 63 or not _NAME.match(name):
            raise self.error(f"invalid label key {lexeme!r}")
        return lexeme

    def value(self) -> str:
        lexeme = self.peek()
        if lexeme is None or lexeme in (",", ")"):
            return ""  # ``key=`` selects an empty value, as in Kubernetes
        if lexeme in _OPERATORS:
            raise self.error(f"expected a label value, found {lexeme!r}")
        self.take()
        if len(lexeme) > 63 or not _NAME.match(lexeme):
            raise self.error(f"invalid label value {lexeme!r}")
        return lexeme

    def value_set(self, op: str) -> frozenset[str]:
        if self.take() != "(":
            raise self.error(f"expected '(' after '{op}'")
        values = [self.value()]
        while (lexeme := self.take()) == ",":
            values.append(self.value())
        if lexeme != ")":
            raise self.error(f"expected ')' to close the '{op}' values")
        if values == [""]:
            raise self.error(f"the values of '{op}' cannot be empty")
        return frozenset(values)


def _describe(requirement: Requirement) -> str:
    return f"the requirement on {requirement.key!r}"
