"""Label selectors: every operator, and the syntax the API server refuses."""

from __future__ import annotations

import pytest

from cdi.api.errors import BadRequest
from cdi.backends.embedded import selectors

LABELS = {"app": "cdi", "tier": "db", "example.com/owner": "alice", "empty": ""}


@pytest.mark.parametrize(("text", "matches"), [
    ("", True),
    ("   ", True),
    ("app=cdi", True),
    ("app==cdi", True),
    ("app=other", False),
    ("app!=other", True),
    ("app!=cdi", False),
    ("missing!=x", True),  # absent labels match !=
    ("app", True),
    ("missing", False),
    ("!missing", True),
    ("!app", False),
    ("app in (cdi,other)", True),
    ("app in (other)", False),
    ("missing in (x)", False),
    ("app notin (other, more)", True),
    ("app notin (cdi)", False),
    ("missing notin (x)", True),  # absent labels match notin
    ("app=cdi,tier=db", True),
    ("app=cdi,tier=web", False),
    (" app = cdi , tier in ( db , web ) , !missing ", True),
    ("example.com/owner=alice", True),
    ("empty=", True),
    ("empty", True),
    ("app=", False),
    ("in=x", False),  # "in" is a valid key name
])
def test_matches(text: str, matches: bool) -> None:
    assert selectors.parse(text).matches(LABELS) is matches


def test_none_selects_everything() -> None:
    assert selectors.parse(None).matches(None)
    assert selectors.parse(None).empty
    assert not selectors.parse("!a").empty
    assert selectors.parse("!a").matches(None)


@pytest.mark.parametrize(("text", "reason"), [
    ("app=cdi,", "expected a label key"),
    (",app", "expected a label key, found ','"),
    ("app cdi", "unknown operator 'cdi'"),
    ("app in cdi", "expected '(' after 'in'"),
    ("app in (cdi", "expected ')'"),
    ("app in ()", "cannot be empty"),
    ("app notin ()", "cannot be empty"),
    ("app = = cdi", "expected a label value, found '='"),
    ("app=cdi tier=db", "expected ',' after the requirement on 'app'"),
    ("!app=cdi", "unexpected '=' after '!app'"),
    ("app>1", "unsupported operator '>'"),
    ("-app=x", "invalid label key '-app'"),
    ("Bad_Prefix/app=x", "bad prefix 'Bad_Prefix'"),
    ("/app=x", "bad prefix ''"),
    ("app=-x", "invalid label value '-x'"),
    ("app=" + "x" * 64, "invalid label value"),
    ("(app)", "expected a label key, found '('"),
])
def test_invalid(text: str, reason: str) -> None:
    with pytest.raises(BadRequest) as e:
        selectors.parse(text)
    assert e.value.message.startswith(f"invalid label selector {text!r}: ")
    assert reason in e.value.message
    assert e.value.status()["code"] == 400
