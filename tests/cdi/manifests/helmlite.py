"""Render the chart's templates without Helm, for the small template subset the chart keeps to.

Helm cannot be installed on the machines that run these tests, so the chart's
templates are held to a subset of Go template syntax small enough to render
here exactly as Helm would (``charts/cdi/README.md`` lists it):

- ``{{ .Values.a.b }}``, ``{{ .Release.Namespace }}``, ``{{ .Release.Name }}``,
  ``{{ .Chart.Name }}``, ``{{ .Chart.Version }}``, ``{{ .Chart.AppVersion }}``;
- pipelines into ``quote``, ``toYaml``, ``indent N`` and ``nindent N``, and
  ``not X`` as a condition;
- ``{{- if X }}`` ... ``{{- else }}`` ... ``{{- end }}`` with Go's truth (false,
  0, "", empty lists and maps and missing values are false);
- ``{{-`` and ``-}}`` whitespace trimming; ``{{/* comments */}}``.

Anything else (``range``, ``with``, ``define``/``include``, ``tpl``, variables,
parentheses, other functions) raises ``Unsupported``, so a template that grows
past the subset fails the test rather than rendering differently from Helm.
A value that does not exist raises ``MissingValue`` (Helm would print
nothing, which hides typos).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from typing import Any

import yaml

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_FIELD = re.compile(r"^(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_FUNCTIONS = frozenset({"quote", "toYaml", "indent", "nindent", "not"})


class Unsupported(Exception):
    pass


class MissingValue(Exception):
    pass


@dataclasses.dataclass
class _If:
    condition: str
    then: list[Any] = dataclasses.field(default_factory=list)
    otherwise: list[Any] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Output:
    pipeline: str


def render(text: str, context: dict[str, Any]) -> str:
    """TEXT rendered with CONTEXT (``{"Values": ..., "Release": ..., "Chart": ...}``)."""
    return _run(_parse(_tokens(text)), context)


def _tokens(text: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) tokens, with the trim markers applied to the text."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if trim_next:
            chunk = chunk.lstrip(" \t\r\n")
        if m.group(1):
            chunk = chunk.rstrip(" \t\r\n")
        tokens.append(("text", chunk))
        tokens.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    chunk = text[pos:]
    tokens.append(("text", chunk.lstrip(" \t\r\n") if trim_next else chunk))
    if "{{" in "".join(t for kind, t in tokens if kind == "text"):
        raise Unsupported("an unterminated or malformed action")
    return tokens


def _parse(tokens: list[tuple[str, str]]) -> list[Any]:
    root: list[Any] = []
    stack: list[tuple[_If, list[Any]]] = []
    current = root
    for kind, value in tokens:
        if kind == "text":
            if value:
                current.append(value)
            continue
        if value.startswith("/*") and value.endswith("*/"):
            continue
        word = value.split(None, 1)[0] if value else ""
        if word == "if":
            node = _If(value[2:].strip())
            current.append(node)
            stack.append((node, current))
            current = node.then
        elif word == "else" and value == "else":
            if not stack or current is stack[-1][0].otherwise:
                raise Unsupported("else without if")
            current = stack[-1][0].otherwise
        elif word == "end" and value == "end":
            if not stack:
                raise Unsupported("end without if")
            current = stack.pop()[1]
        elif word in ("range", "with", "define", "template", "block", "include", "else", "end"):
            raise Unsupported(f"{{{{ {value} }}}} is outside the chart's template subset")
        else:
            current.append(_Output(value))
    if stack:
        raise Unsupported("if without end")
    return root


def _run(nodes: list[Any], context: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _If):
            branch = node.then if _truth(_pipeline(node.condition, context)) else node.otherwise
            out.append(_run(branch, context))
        else:
            out.append(_print(_pipeline(node.pipeline, context)))
    return "".join(out)


def _pipeline(text: str, context: dict[str, Any]) -> Any:
    if any(c in text for c in "()$:="):
        raise Unsupported(f"{{{{ {text} }}}}: parentheses and variables are outside the subset")
    value: Any = None
    for i, command in enumerate(text.split("|")):
        try:
            words = shlex.split(command)
        except ValueError as e:
            raise Unsupported(f"{{{{ {text} }}}}: {e}") from e
        if not words:
            raise Unsupported(f"{{{{ {text} }}}}: empty command")
        args = [_argument(w, context) for w in words[1:]]
        if i > 0:
            args.append(value)
        head = words[0]
        if head in _FUNCTIONS:
            value = _call(head, args)
        elif len(words) == 1 and i == 0:
            value = _argument(head, context)
        else:
            raise Unsupported(f"{{{{ {text} }}}}: {head} is outside the subset")
    return value


def _argument(word: str, context: dict[str, Any]) -> Any:
    if _FIELD.match(word):
        node: Any = context
        for key in word[1:].split("."):
            if not isinstance(node, dict) or key not in node:
                raise MissingValue(word)
            node = node[key]
        return node
    if re.fullmatch(r"-?\d+", word):
        return int(word)
    raise Unsupported(f"argument {word!r} is outside the subset")


def _call(name: str, args: list[Any]) -> Any:
    if name == "quote":
        return " ".join(json.dumps(_print(a)) for a in args)
    if name == "not":
        return not _truth(args[0])
    if name == "toYaml":
        return _to_yaml(args[0])
    count, text = args
    pad = " " * count
    indented = "\n".join(pad + line for line in str(text).split("\n"))
    return "\n" + indented if name == "nindent" else indented


def _to_yaml(value: Any) -> str:
    """Helm's toYaml: block style, sorted keys, no trailing newline."""
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and value != [] and value != {}


def _print(value: Any) -> str:
    if value is None:  # Helm prints a null value as nothing
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        raise Unsupported("printing a map or list: pipe it into toYaml")
    return str(value)
