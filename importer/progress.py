"""Progress of one import, as Prometheus metrics and as log lines.

The controller shows users a percentage (CDI's ``kubevirt_cdi_import_progress_total``
counter, 0-100 and only ever increased) and, beyond CDI, bytes, rate and an ETA,
computed from the byte counters exported here.  The worker updates a
``Progress`` object from its copy loop or from qemu-img's ``-p`` output; the
metrics endpoint reads it.  Over TLS when it listens beyond loopback.
"""

from __future__ import annotations

import datetime
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import prometheus_client

from importer import settings

log = logging.getLogger(__name__)

LOG_INTERVAL = 5.0  # seconds between progress log lines


class Progress:
    """Bytes moved in the current phase, and the CDI percentage counter."""

    def __init__(self, owner_uid: str = "", registry: Any = None) -> None:
        self.registry = registry or prometheus_client.CollectorRegistry()
        labels = {"ownerUID": owner_uid}
        self._lock = threading.Lock()
        self._percent = prometheus_client.Counter(
            "kubevirt_cdi_import_progress", "Import progress in percent (0-100)",
            ["ownerUID"], registry=self.registry,
        ).labels(**labels)
        self._read = prometheus_client.Gauge(
            "kubevirt_cdi_import_bytes_read", "Bytes of the source read so far in this attempt",
            ["ownerUID"], registry=self.registry,
        ).labels(**labels)
        self._total = prometheus_client.Gauge(
            "kubevirt_cdi_import_bytes_expected",
            "Size of the source in bytes, 0 when the source does not say",
            ["ownerUID"], registry=self.registry,
        ).labels(**labels)
        self._written = prometheus_client.Gauge(
            "kubevirt_cdi_import_bytes_written", "Bytes of image data written to the volume",
            ["ownerUID"], registry=self.registry,
        ).labels(**labels)
        self._phase = prometheus_client.Enum(
            "kubevirt_cdi_import_phase", "What the importer is doing",
            ["ownerUID"], states=["info", "transfer", "convert", "resize", "complete"],
            registry=self.registry,
        ).labels(**labels)
        self.percent = 0.0
        self.bytes_read = 0
        self.bytes_total = 0
        self.phase = "info"
        self._started = time.monotonic()
        self._logged = 0.0

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
            self._phase.state(phase)
        log.info("PHASE %s", phase)

    def set_total(self, total: int | None) -> None:
        with self._lock:
            self.bytes_total = total or 0
            self._total.set(self.bytes_total)

    def restart(self) -> None:
        """The transfer starts over; the counters of bytes go back to 0 (the percent cannot)."""
        with self._lock:
            self._read.set(0)
            self.bytes_read = 0

    def add_read(self, n: int) -> None:
        self.bytes_read += n
        self._read.inc(n)
        if self.bytes_total:
            self.set_percent(100.0 * self.bytes_read / self.bytes_total)
        self._maybe_log()

    def set_written(self, n: int) -> None:
        self._written.set(n)

    def set_percent(self, percent: float) -> None:
        percent = min(percent, 100.0)
        if percent > self.percent:
            self._percent.inc(percent - self.percent)
            self.percent = percent

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._logged >= LOG_INTERVAL:
            self._logged = now
            rate = self.bytes_read / max(now - self._started, 1e-6)
            log.info("PROGRESS phase=%s read=%d total=%d percent=%.2f rate=%.0f",
                     self.phase, self.bytes_read, self.bytes_total, self.percent, rate)


def serve(progress: Progress, address: str, address_file: Path | None) -> Any:
    """Start the metrics endpoint; TLS (self-signed) unless it listens on loopback."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - a pod's metrics port is meant to be reached
    certfile = keyfile = None
    if not settings.is_loopback(host):
        certfile, keyfile = _self_signed()
    server, _thread = prometheus_client.start_http_server(
        int(port or 0), addr=host, registry=progress.registry, certfile=certfile, keyfile=keyfile
    )
    bound_host, bound_port = server.server_address[:2]
    host_text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
    log.info("METRICS address=%s:%s tls=%s", host_text, bound_port, certfile is not None)
    if address_file is not None:
        address_file.write_text(f"{host_text}:{bound_port}\n")
    return server


def _self_signed() -> tuple[str, str]:
    # Imported here: only a metrics endpoint beyond loopback needs it, and it
    # costs a worker 60 ms of start-up.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cdi-importer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    d = Path(tempfile.mkdtemp(prefix="cdi-metrics-"))
    (d / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (d / "tls.key").chmod(0o600)
    return str(d / "tls.crt"), str(d / "tls.key")
