"""The Containerfile builds the one image the chart runs, with every entry point pyproject declares.

It cannot be built here (no container engine), so this reads it: the
``[project.scripts]`` entry points are named and installed from this source
tree, the system packages the workers run are installed, the user is the UID
the pods run as, and the commands the Deployments run are the image's.
"""

from __future__ import annotations

import re
import tomllib

from cdi.manifests import render, values, workloads
from tests.cdi.manifests.chart import ROOT

CONTAINERFILE = ROOT / "Containerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_names_every_entry_point_of_pyproject() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"cdi", "cdi-importer", "cdi-uploadserver", "cdi-clone-source"}
    text = CONTAINERFILE.read_text()
    for name in scripts:
        assert re.search(rf"(?m)^#\s+{re.escape(name)}\s", text), f"{name} is not described"
    entry = [args for word, args in _instructions() if word == "ENTRYPOINT"]
    assert entry == ['["cdi"]']


def test_installs_the_project_and_what_the_workers_run() -> None:
    steps = _instructions()
    runs = " ".join(args for word, args in steps if word == "RUN")
    copied = [args for word, args in steps if word == "COPY"]
    for package in ("cdi", "importer", "uploadproxy"):
        assert f"{package} ./{package}" in copied, package
    assert "pyproject.toml README.md ./" in copied
    for package in ("qemu-utils", "nbdkit", "ca-certificates"):
        assert re.search(rf"\b{package}\b", runs), package
    assert "nbdkit-curl-plugin.so" in runs, "the curl plugin must be there"
    bases = [args for word, args in steps if word == "FROM"]
    assert all(re.match(r"docker\.io/library/python:3\.1[1-9]-slim", b) for b in bases)


def test_runs_as_the_pods_user() -> None:
    steps = _instructions()
    users = [args for word, args in steps if word == "USER"]
    assert users == [f"{workloads.UID}:{workloads.UID}"]
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert f"--uid {workloads.UID}" in runs and f"--gid {workloads.UID}" in runs
    for obj in render.objects(values.load()):
        if obj["kind"] == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == workloads.UID
            assert pod["containers"][0]["command"][0] in {"cdi"}
