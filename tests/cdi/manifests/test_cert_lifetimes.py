"""The chart's ``certificates.ca`` and ``certificates.server`` reach ``cdi controller`` and
``cdi apiserver`` (which make and rotate the certificates in generate mode) as environment
variables the commands read, in a form they accept."""

from __future__ import annotations

import datetime

import click
import pytest

from cdi.api.certconfig import CertConfig
from cdi.cli import apiserver, controller
from cdi.manifests import values
from tests.cdi.manifests.chart import by_key, render_chart

SETS = ["certificates.ca.duration=96h0m0s", "certificates.ca.renewBefore=48h0m0s",
        "certificates.server.duration=36h0m0s", "certificates.server.renewBefore=18h0m0s"]
WANTED = {"CDI_CA_DURATION": "96h0m0s", "CDI_CA_RENEW_BEFORE": "48h0m0s",
          "CDI_SERVER_DURATION": "36h0m0s", "CDI_SERVER_RENEW_BEFORE": "18h0m0s"}


@pytest.mark.parametrize(("deployment", "command"), [
    ("cdi-deployment", controller.controller), ("cdi-apiserver", apiserver.apiserver)])
def test_the_lifetimes_reach_the_commands(deployment: str, command: click.Command) -> None:
    objs = by_key(render_chart(values.load(sets=SETS), "cdi"))
    (container,) = objs[("apps/v1", "Deployment", "cdi", deployment)][
        "spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {k: env.get(k) for k in WANTED} == WANTED
    assert env["CDI_CERTIFICATES"] == "generate"
    params = {p.envvar: p for p in command.params if p.envvar}
    assert set(WANTED) <= set(params)
    certs = CertConfig.parse(ca_duration=env["CDI_CA_DURATION"],
                             ca_renew_before=env["CDI_CA_RENEW_BEFORE"],
                             server_duration=env["CDI_SERVER_DURATION"],
                             server_renew_before=env["CDI_SERVER_RENEW_BEFORE"])
    hour = datetime.timedelta(hours=1)
    assert (certs.ca.duration, certs.ca.renew_before) == (96 * hour, 48 * hour)
    assert (certs.server.duration, certs.server.renew_before) == (36 * hour, 18 * hour)


def test_the_commands_default_to_cdis_lifetimes() -> None:
    for command in (controller.controller, apiserver.apiserver):
        defaults = {p.envvar: p.default for p in command.params if p.envvar in (
            "CDI_CA_DURATION", "CDI_CA_RENEW_BEFORE", "CDI_SERVER_DURATION",
            "CDI_SERVER_RENEW_BEFORE")}
        assert defaults == {"CDI_CA_DURATION": "48h0m0s", "CDI_CA_RENEW_BEFORE": "24h0m0s",
                            "CDI_SERVER_DURATION": "24h0m0s",
                            "CDI_SERVER_RENEW_BEFORE": "12h0m0s"}
