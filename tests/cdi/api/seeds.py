"""Pull the CDI manifests out of product documentation text and undo the documentation's artefacts.

The seed files are documentation pages (Chinese, Japanese) with YAML examples
pasted into the prose, indented, with callout numbers at line ends and elided
parts.  ``extract`` finds every YAML block that starts with an ``apiVersion:``
line, ``clean_lines`` and ``fill_placeholders`` remove what the documentation
added, and nothing else:

1. Block boundaries.  A block starts at a line that is only ``apiVersion: <x>``
   (any indentation I).  It continues over blank lines, lines indented deeper
   than I, and lines at indentation I that are YAML (``key:``, ``- item``,
   ``# comment``, ``---``); it ends at the first other line (the prose, or the
   callout legend "1", "2" that follows every example).  The block is then
   dedented by I.  ``---`` splits a block into documents.
2. Callout numbers.  Callouts are numbered 1, 2, 3, ... within a block, so only
   the next expected number is a candidate: a line ending in " <n>" loses it
   when what remains is still a complete YAML line (``key: value``,
   ``- value``, a bare scalar continuing the previous key) or is an opening
   ``key:`` whose next line is indented deeper (``source: 1``).
   ``importsToKeep: 3`` followed by a sibling is a value and stays.
3. Ellipsis lines.  Lines that are only ``# ...`` (elided content) are dropped.
4. Placeholders.  After parsing, every string value that is entirely
   ``<something>`` is replaced by a valid sample of the field's type (see
   ``sample_for``): a quantity for sizes (the placeholder's own text when it is
   one, "<2Gi>" -> "2Gi"), a ``docker://`` reference for registry URLs, an
   ``https://`` URL for other URLs, and a DNS-1123 name made from the
   placeholder text for everything else ("<my_vm_disk>" -> "my-vm-disk").

Nothing else is changed: no field is added, removed or renamed.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from importer.units import parse_quantity

CDI_KINDS = ("DataVolume", "DataImportCron", "StorageProfile")

_START = re.compile(r"^(?P<indent> *)apiVersion:\s*\S+\s*$")
_YAML_AT_BLOCK_INDENT = re.compile(r"^(?:[A-Za-z_\"'][^:]*:(?:\s|$)|- |-$|#|---)")
_CALLOUT = re.compile(r"^(?P<rest>.*\S)\s+(?P<n>\d{1,2})\s*$")
_OPENING_KEY = re.compile(r"^\s*(?:- )?[^\s#][^:]*:$")
_PLACEHOLDER = re.compile(r"^<([^<>]+)>$")


@dataclasses.dataclass
class Manifest:
    file: str
    line: int  # 1-based line of the block's apiVersion
    obj: dict[str, Any]


def extract(path: Path) -> list[Manifest]:
    """Every YAML document in ``path`` whose kind is a CDI kind and apiVersion cdi.kubevirt.io/*."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for start, block in _blocks(lines):
        text = "\n".join(clean_lines(block))
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError:
            if _mentions_cdi_kind(text):
                raise  # a CDI manifest we failed to clean: the test must see it
            continue  # some other product's example, not ours to repair
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") in CDI_KINDS and \
                    str(doc.get("apiVersion", "")).startswith("cdi.kubevirt.io/"):
                found.append(Manifest(path.name, start + 1, fill_placeholders(doc)))
    return found


def cron_templates(path: Path) -> list[Manifest]:
    """The DataImportCrons of HyperConverged examples (``dataImportCronTemplates`` in spec
    or status): each entry is a cron's metadata and spec, wrapped here as the object."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for start, block in _blocks(lines):
        text = "\n".join(clean_lines(block))
        if "dataImportCronTemplates" not in text:
            continue
        for doc in yaml.safe_load_all(text):
            if not isinstance(doc, dict) or doc.get("kind") != "HyperConverged":
                continue
            for part in ("spec", "status"):
                for entry in (doc.get(part) or {}).get("dataImportCronTemplates") or []:
                    cron = {"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataImportCron",
                            **{k: v for k, v in entry.items() if k != "status"}}
                    found.append(Manifest(path.name, start + 1, fill_placeholders(cron)))
    return found


def _mentions_cdi_kind(text: str) -> bool:
    return "cdi.kubevirt.io/" in text and any(
        re.search(rf"^\s*kind:\s*{kind}\s*$", text, re.MULTILINE) for kind in CDI_KINDS)


def _blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    blocks = []
    i = 0
    while i < len(lines):
        m = _START.match(lines[i])
        if m is None:
            i += 1
            continue
        indent = len(m.group("indent"))
        end = i + 1
        while end < len(lines):
            line = lines[end]
            if line.strip():
                depth = len(line) - len(line.lstrip(" "))
                if depth < indent:
                    break
                if depth == indent and not _YAML_AT_BLOCK_INDENT.match(line[indent:]):
                    break
            end += 1
        blocks.append((i, [line[indent:] for line in lines[i:end]]))
        i = end
    return blocks


def clean_lines(block: list[str]) -> list[str]:
    """Drop ``# ...`` lines and the callout numbers (see the module docstring, steps 2-3)."""
    kept = [line.rstrip() for line in block if line.strip() != "# ..."]
    expected = 1
    out = []
    for i, line in enumerate(kept):
        m = _CALLOUT.match(line)
        if m is not None and int(m.group("n")) == expected and not line.lstrip().startswith("#"):
            rest = m.group("rest")
            if _is_callout(rest, kept[i + 1:], _indent(line)):
                line = rest
                expected += 1
        out.append(line)
    return out


def _is_callout(rest: str, following: list[str], indent: int) -> bool:
    if _OPENING_KEY.match(rest):
        # "key: 1" is a callout only if the key opens a nested block: the next line is
        # deeper, or is a list item at the key's own indentation.
        nxt = next((f for f in following if f.strip()), "")
        return _indent(nxt) > indent or (_indent(nxt) == indent and nxt.lstrip().startswith("-"))
    return True


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def fill_placeholders(value: Any, path: tuple[str, ...] = ()) -> Any:
    """Replace every ``<placeholder>`` string value by ``sample_for(path, text)``."""
    if isinstance(value, dict):
        return {k: fill_placeholders(v, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, path) for v in value]
    if isinstance(value, str):
        m = _PLACEHOLDER.match(value.strip())
        if m is not None:
            return sample_for(path, m.group(1))
    return value


def sample_for(path: tuple[str, ...], text: str) -> str:
    """A valid value for the field at ``path`` standing in for ``<text>``."""
    name = re.sub(r"[^a-z0-9.-]+", "-", text.strip().lower()).strip("-.") or "example"
    if path[-2:] == ("requests", "storage") or path[-1:] == ("storage",):
        try:
            parse_quantity(text)
        except ValueError:
            return "1Gi"
        return text.strip()
    if path[-2:] == ("registry", "url"):
        return f"docker://registry.example.com/{name}:latest"
    if path[-1:] == ("url",):
        return f"https://images.example.com/{name}.img"
    return name
