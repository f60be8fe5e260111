"""JSON merge patch (RFC 7386), the ``patch`` verb of the object store.

Kubernetes clients send ``application/merge-patch+json`` to change a few fields
without a read-modify-write cycle (``kubectl patch --type merge``, controllers
adding a finalizer or a condition).  The rules are the RFC's: an object in the
patch merges into the target key by key, recursively; ``null`` removes the key;
anything else (a string, a number, a list) replaces the target value whole.
Lists are never merged element by element; that is strategic merge patch,
which the store does not speak.

The function is pure and never aliases its inputs: the result shares no
mutable value with ``target`` or ``patch``, so callers may mutate either
afterwards.
"""

from __future__ import annotations

import copy
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with ``patch`` applied, as RFC 7386 section 2 defines it."""
    return _apply(copy.deepcopy(target), patch)


def _apply(target: Any, patch: Any) -> Any:
    # ``target`` is our own copy here, so it is updated in place.
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: dict[str, Any] = target if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _apply(result.get(key), value)
    return result
