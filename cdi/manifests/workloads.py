"""The control plane's processes on a cluster and how the cluster reaches them.

Three Deployments run the one image: the controller (``cdi-deployment``, the
reconcilers and the leader election), the apiserver (``cdi-apiserver``: the
aggregated ``upload.cdi.kubevirt.io`` API and the DataVolume admission
webhooks) and the upload proxy (``cdi-uploadproxy``).  Names, ports (HTTPS
8443 behind Services on 443), service accounts and labels are CDI's, so tools
that look for ``cdi-uploadproxy`` or ``cdi-api`` find them.

Every pod runs under the restricted Pod Security profile: non-root UID/GID/
fsGroup 107 (the image's user, as CDI's workers), no privilege escalation, all
capabilities dropped, the runtime's seccomp profile, and a read-only root with
an emptyDir ``/tmp``.  Each container has a readiness and a liveness probe on
``GET /healthz`` over HTTPS.

Certificates: by default the apiserver makes and rotates every certificate
itself, as CDI's operator does (Secrets named as below, CA bundles patched
into the webhooks and the APIService, lifetimes from the CDI resource's
``certConfig``).  With ``certificates.certManager.enabled`` the same Secrets
are cert-manager's: a self-signed issuer bootstraps the CAs (the apiserver's,
the upload proxy's, the upload servers' and the one behind the proxy's client
certificate), CA issuers sign the leaf certificates, and
``cert-manager.io/inject-ca-from`` fills the CA bundles.

The container commands are the contract with the Kubernetes entry points
(``cdi controller``, ``cdi apiserver``, ``cdi uploadproxy``): see
``docs/kubernetes.md`` for what they read.
"""

from __future__ import annotations

import copy
from typing import Any

from cdi.api import pki
from cdi.manifests import rbac

Obj = dict[str, Any]

PORT = 8443
API_SERVICE_NAME = "cdi-api"
UPLOADPROXY = "cdi-uploadproxy"
APISERVER = "cdi-apiserver"
CONTROLLER = "cdi-deployment"
COMPONENT_LABEL = "cdi.kubevirt.io"
PROMETHEUS_LABEL = "prometheus.cdi.kubevirt.io"
UID = 107
SERVER_CERT_SUFFIX = "-server-cert"
UPLOADSERVER_CLIENT_CERT = "cdi-uploadserver-client-cert"
SIGNING_KEY_SECRET = "cdi-api-signing-key"  # noqa: S105 - a Secret's name
WEBHOOK_TIMEOUT = 30

_LABELS = rbac.LABELS


def image(values: Obj) -> str:
    return f"{values['image']['repository']}:{values['image']['tag']}"


def deployments(values: Obj, namespace: str) -> list[Obj]:
    cert_manager = bool(values["certificates"]["certManager"]["enabled"])
    certs = "cert-manager" if cert_manager else "generate"
    controller_env = [
        {"name": "IMPORTER_IMAGE", "value": image(values)},
        {"name": "UPLOADSERVER_IMAGE", "value": image(values)},
        {"name": "CLONER_IMAGE", "value": image(values)},
        {"name": "PULL_POLICY", "value": values["image"]["pullPolicy"]},
        {"name": "UPLOADPROXY_SERVICE", "value": UPLOADPROXY},
        {"name": "CDI_CERTIFICATES", "value": certs},
        *lifetime_env(values),
        # The controller checks clone tokens with the public half of the signing key.
        {"name": "APISERVER_PUBLIC_KEY", "valueFrom": {"secretKeyRef": {
            "name": SIGNING_KEY_SECRET, "key": "id_rsa.pub"}}},
    ]
    apiserver_volumes = [(f"{APISERVER}{SERVER_CERT_SUFFIX}", "/var/run/certs/server")] \
        if cert_manager else []
    proxy_volumes = [(f"{UPLOADPROXY}{SERVER_CERT_SUFFIX}", "/var/run/certs/server"),
                     (UPLOADSERVER_CLIENT_CERT, "/var/run/certs/client")]
    proxy_env = [{"name": "APISERVER_PUBLIC_KEY", "valueFrom": {"secretKeyRef": {
        "name": SIGNING_KEY_SECRET, "key": "id_rsa.pub"}}}]
    return [
        deployment(values, namespace, CONTROLLER, rbac.CONTROLLER_SA, "controller",
                   env=controller_env, metrics=True),
        deployment(values, namespace, APISERVER, rbac.APISERVER_SA, "apiserver",
                   env=[{"name": "CDI_CERTIFICATES", "value": certs},
                        *lifetime_env(values)],
                   secrets=apiserver_volumes),
        deployment(values, namespace, UPLOADPROXY, rbac.UPLOADPROXY_SA, "uploadproxy",
                   env=proxy_env, secrets=proxy_volumes),
    ]


def lifetime_env(values: Obj) -> list[Obj]:
    """``certificates.ca`` and ``.server`` for the controller and the apiserver, which make
    and rotate the certificates in generate mode (``cdi/cli/certrotation.py``)."""
    certs = values["certificates"]
    return [{"name": f"CDI_{which.upper()}_{env}", "value": str(certs[which][key])}
            for which in ("ca", "server")
            for key, env in (("duration", "DURATION"), ("renewBefore", "RENEW_BEFORE"))]


def deployment(values: Obj, namespace: str, name: str, service_account: str, component: str,
               *, env: list[Obj], secrets: list[tuple[str, str]] | None = None,
               metrics: bool = False) -> Obj:
    labels = {**_LABELS, COMPONENT_LABEL: name}
    if metrics:
        labels[PROMETHEUS_LABEL] = "true"
    probe = {"httpGet": {"path": "/healthz", "port": PORT, "scheme": "HTTPS"},
             "initialDelaySeconds": 2, "periodSeconds": 5, "timeoutSeconds": 1,
             "failureThreshold": 3}
    mounts: list[Obj] = [{"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108 - an emptyDir
    volumes: list[Obj] = [{"name": "tmp", "emptyDir": {}}]
    for secret, path in secrets or []:
        mounts.append({"name": secret, "mountPath": path, "readOnly": True})
        volumes.append({"name": secret, "secret": {"secretName": secret}})
    container: Obj = {
        "name": name,
        "image": image(values),
        "imagePullPolicy": values["image"]["pullPolicy"],
        "command": ["cdi", component],
        "env": [{"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.namespace"}}}, *env],
        "ports": [{"name": "metrics" if metrics else "https", "containerPort": PORT,
                   "protocol": "TCP"}],
        "readinessProbe": copy.deepcopy(probe),
        "livenessProbe": {**copy.deepcopy(probe), "initialDelaySeconds": 15,
                          "periodSeconds": 20, "failureThreshold": 6},
        "resources": copy.deepcopy(values["resources"][component]),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {COMPONENT_LABEL: name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": service_account,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "fsGroup": UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def services(namespace: str) -> list[Obj]:
    def service(name: str, selector: Obj, port: Obj) -> Obj:
        return {"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": namespace,
                             "labels": {**_LABELS, **selector}},
                "spec": {"type": "ClusterIP", "selector": selector, "ports": [port]}}

    https = {"name": "https", "port": 443, "targetPort": PORT, "protocol": "TCP"}
    return [
        service(API_SERVICE_NAME, {COMPONENT_LABEL: APISERVER}, https),
        service(UPLOADPROXY, {COMPONENT_LABEL: UPLOADPROXY}, https),
        service("cdi-prometheus-metrics", {PROMETHEUS_LABEL: "true"},
                {"name": "metrics", "port": PORT, "targetPort": "metrics", "protocol": "TCP"}),
    ]


def _ca_annotations(values: Obj, namespace: str) -> Obj:
    if not values["certificates"]["certManager"]["enabled"]:
        return {}
    return {"annotations": {
        "cert-manager.io/inject-ca-from": f"{namespace}/{APISERVER}{SERVER_CERT_SUFFIX}"}}


def api_service(values: Obj, namespace: str) -> Obj:
    """``upload.cdi.kubevirt.io/v1beta1``, served by the apiserver behind ``cdi-api``.

    Without cert-manager the apiserver fills in ``caBundle`` itself once it has
    made its certificate; until then the API shows as unavailable.
    """
    return {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": rbac.API_SERVICE, "labels": dict(_LABELS),
                     **_ca_annotations(values, namespace)},
        "spec": {"group": rbac.UPLOAD, "version": "v1beta1",
                 "service": {"namespace": namespace, "name": API_SERVICE_NAME, "port": 443},
                 "groupPriorityMinimum": 1000, "versionPriority": 15},
    }


def webhooks(values: Obj, namespace: str) -> list[Obj]:
    """The webhooks: DataVolume validate (CDI's admission rules) and mutate (clone checks),
    DataImportCron validate."""
    def hook(kind: str, name: str, path: str, resource: str = "datavolumes") -> Obj:
        entry: Obj = {
            "name": f"{path.strip('/')}.cdi.kubevirt.io",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"namespace": namespace, "name": API_SERVICE_NAME,
                                         "path": path, "port": 443}},
            "rules": [{"operations": ["CREATE", "UPDATE"], "apiGroups": ["cdi.kubevirt.io"],
                       "apiVersions": ["v1beta1"], "resources": [resource],
                       "scope": "*"}],
            "failurePolicy": "Fail",
            "matchPolicy": "Exact",
            "sideEffects": "None",
            "timeoutSeconds": WEBHOOK_TIMEOUT,
        }
        if kind == "MutatingWebhookConfiguration":
            entry["reinvocationPolicy"] = "Never"
        return {"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
                "metadata": {"name": name, "labels": dict(_LABELS),
                             **_ca_annotations(values, namespace)},
                "webhooks": [entry]}

    return [
        hook("ValidatingWebhookConfiguration", "cdi-api-datavolume-validate",
             "/datavolume-validate"),
        hook("MutatingWebhookConfiguration", "cdi-api-datavolume-mutate", "/datavolume-mutate"),
        hook("ValidatingWebhookConfiguration", "cdi-api-dataimportcron-validate",
             "/dataimportcron-validate", "dataimportcrons"),
    ]


# --- certificates by cert-manager -------------------------------------------------------------

CERT_MANAGER_API = "cert-manager.io/v1"
SELF_SIGNED = "cdi-selfsigned"
CLIENT_NAME = pki.UPLOAD_CLIENT_NAME


def cert_manager_objects(values: Obj, namespace: str) -> list[Obj]:
    """The Issuers and Certificates, or nothing when cert-manager is not enabled."""
    certs = values["certificates"]
    if not certs["certManager"]["enabled"]:
        return []
    ca, server = certs["ca"], certs["server"]
    apiserver = APISERVER
    proxy = UPLOADPROXY
    found = [_issuer(SELF_SIGNED, namespace, {"selfSigned": {}})]
    for signer in (f"{apiserver}-signer", f"{proxy}-signer", "cdi-uploadserver-signer",
                   "cdi-uploadserver-client-signer"):
        found.append(_certificate(signer, namespace, ca, SELF_SIGNED,
                                  {"isCA": True, "commonName": signer}))
    for signer in (f"{apiserver}-signer", f"{proxy}-signer", "cdi-uploadserver-client-signer"):
        found.append(_issuer(signer, namespace, {"ca": {"secretName": signer}}))
    found.append(_certificate(
        f"{apiserver}{SERVER_CERT_SUFFIX}", namespace, server, f"{apiserver}-signer",
        {"dnsNames": _dns(API_SERVICE_NAME, namespace), "usages": ["server auth"]}))
    found.append(_certificate(
        f"{proxy}{SERVER_CERT_SUFFIX}", namespace, server, f"{proxy}-signer",
        {"dnsNames": _dns(proxy, namespace), "usages": ["server auth"]}))
    found.append(_certificate(
        UPLOADSERVER_CLIENT_CERT, namespace, server, "cdi-uploadserver-client-signer",
        {"commonName": CLIENT_NAME, "usages": ["client auth"]}))
    return found


def _dns(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc"]


def _issuer(name: str, namespace: str, spec: Obj) -> Obj:
    return {"apiVersion": CERT_MANAGER_API, "kind": "Issuer",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(_LABELS)},
            "spec": spec}


def _certificate(name: str, namespace: str, lifetime: Obj, issuer: str, extra: Obj) -> Obj:
    spec: Obj = {"secretName": name, **extra,
                 "duration": lifetime["duration"], "renewBefore": lifetime["renewBefore"],
                 "privateKey": {"algorithm": "RSA", "size": 2048, "rotationPolicy": "Always"},
                 "issuerRef": {"name": issuer, "kind": "Issuer", "group": "cert-manager.io"}}
    return {"apiVersion": CERT_MANAGER_API, "kind": "Certificate",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(_LABELS)},
            "spec": spec}
