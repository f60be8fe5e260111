"""JSON merge patch: RFC 7386's own examples, and no aliasing of the inputs."""

from __future__ import annotations

from typing import Any

import pytest

from cdi.backends.embedded.mergepatch import merge_patch

RFC_7386_APPENDIX_A: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_7386_APPENDIX_A)
def test_rfc_examples(target: Any, patch: Any, result: Any) -> None:
    assert merge_patch(target, patch) == result


def test_inputs_are_neither_changed_nor_shared() -> None:
    target: dict[str, Any] = {"spec": {"a": {"x": 1}, "keep": [1]}, "status": {"phase": "Pending"}}
    patch: dict[str, Any] = {"spec": {"a": {"y": [1, 2]}, "new": {"z": 1}}, "status": None}
    result = merge_patch(target, patch)
    assert result == {"spec": {"a": {"x": 1, "y": [1, 2]}, "keep": [1], "new": {"z": 1}}}
    assert target == {"spec": {"a": {"x": 1}, "keep": [1]}, "status": {"phase": "Pending"}}
    result["spec"]["keep"].append(2)
    result["spec"]["a"]["y"].append(3)
    result["spec"]["new"]["z"] = 2
    assert target["spec"]["keep"] == [1]
    assert patch == {"spec": {"a": {"y": [1, 2]}, "new": {"z": 1}}, "status": None}
