"""The embedded pod runner: one worker subprocess per Pod object.

It plays the kubelet's part for the worker pods the controllers create: mounts
become paths (a claim mounted at ``/data`` is the volume's directory, a claim
at device ``/dev/cdi-block-volume`` is the volume's raw file), each container
runs as a subprocess with its environment, ``restartPolicy: OnFailure`` restarts
it with exponential backoff, and exit code, termination message and restart
count land in the Pod's status as a kubelet would write them.  Output goes to
a log file per pod (``cdi logs``).  An upload server also listens on a Unix
socket in ``<data dir>/run`` (0700; ``LISTEN_SOCKET``), published in the
annotation ``embedded.cdi.kubevirt.io/upload-socket`` with its address: the
upload proxy and clone sources, which run as the same user, reach it there
without TLS (``docs/security.md``, local sockets).  Workers die with ``cdi serve``
(``setpriv --pdeathsig``), and a worker left from a killed ``cdi serve`` is
stopped on the next start before its pod runs again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import hashlib
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from cdi.api import errors
from cdi.backends.embedded.storage import NODE_NAME, SELECTED_NODE, Volumes
from cdi.backends.port import Obj, ObjectStore

log = logging.getLogger(__name__)

METRICS_ANNOTATION = "embedded.cdi.kubevirt.io/metrics-address"
PID_ANNOTATION = "embedded.cdi.kubevirt.io/pid"
# Where a worker's mounts go in its settings (the pod paths of CDI's importer).
MOUNT_ENV = {
    "/data": "IMPORTER_DATA_DIR",
    "/scratch": "IMPORTER_SCRATCH_DIR",
    "/certs": "IMPORTER_CERT_DIR",
    "/proxycerts/": "IMPORTER_PROXY_CERT_DIR",
    "/var/run/cdi/clone/source": "CLONE_SOURCE_DIR",
}
DEVICE_ENV = {"/dev/cdi-block-volume": "IMPORTER_BLOCK_PATH"}
COMMANDS = {"cdi-importer": [sys.executable, "-m", "importer"],
            "cdi-uploadserver": [sys.executable, "-m", "importer.uploadserver"],
            "cdi-clone-source": [sys.executable, "-m", "importer.clonesource"]}
UPLOAD_ANNOTATION = "embedded.cdi.kubevirt.io/upload-address"
SOCKET_ANNOTATION = "embedded.cdi.kubevirt.io/upload-socket"
SOCKET_PATH_MAX = 107  # sun_path, less its NUL
STOP_GRACE = 10.0
CONFIG_RETRY = 0.5  # seconds between looks for a missing Secret or ConfigMap


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodRunner:
    def __init__(self, store: ObjectStore, *, data_dir: Path, volumes: Volumes,
                 backoff_base: float = 10.0, backoff_max: float = 300.0,
                 max_running: int | None = None) -> None:
        self._store = store
        # Like a node's capacity: pods beyond it stay Pending until a worker ends.
        self._slots = asyncio.Semaphore(max_running or max(4, 2 * (os.cpu_count() or 1)))
        self._root = data_dir / "pods"
        self._sockets = data_dir / "run"  # short: a socket's path must fit in 107 bytes
        self._volumes = volumes
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._supervisors: dict[str, asyncio.Task[None]] = {}  # by pod uid
        self._names: dict[str, tuple[str, str]] = {}  # pod uid -> (namespace, name)
        self._deleted: set[str] = set()  # uids of deleted pods not yet cleaned up

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self._root / namespace / name

    def log_path(self, namespace: str, name: str) -> Path | None:
        p = self.pod_dir(namespace, name) / "log"
        return p if p.exists() else None

    async def run(self) -> None:
        try:
            while True:
                try:
                    listed = await self._store.list("Pod")
                    for pod in listed.items:
                        self._handle("ADDED", pod)
                    async for ev in self._store.watch("Pod",
                                                      resource_version=listed.resource_version):
                        self._handle(ev.type, ev.object)
                    return
                except asyncio.CancelledError:
                    raise
                except errors.Gone:
                    continue
                except Exception:
                    log.exception("PODRUNNER watch failed; relisting")
                    await asyncio.sleep(1)
        finally:
            await self.stop_all()

    async def stop_all(self) -> None:
        tasks = list(self._supervisors.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._supervisors.clear()

    def _handle(self, event: str, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        task = self._supervisors.get(uid)
        if event == "DELETED" or meta.get("deletionTimestamp"):
            if event == "DELETED":
                self._deleted.add(uid)
            if task is not None:
                task.cancel()  # its finally stops the worker, then cleans up
            elif event == "DELETED":
                shutil.rmtree(self.pod_dir(meta["namespace"], meta["name"]), ignore_errors=True)
            return
        phase = pod.get("status", {}).get("phase")
        if task is None and phase not in ("Succeeded", "Failed") and uid not in self._deleted:
            key = (meta["namespace"], meta["name"])
            # A pod of the same name that is still stopping must be gone first: two
            # workers must never write one volume.
            earlier = [t for u, t in self._supervisors.items() if self._names.get(u) == key]
            task = asyncio.get_running_loop().create_task(
                self._supervise(pod, after=earlier), name=f"pod-{key[0]}-{key[1]}")
            self._supervisors[uid] = task
            self._names[uid] = key
            task.add_done_callback(functools.partial(self._forget, uid))

    def _forget(self, uid: str, _task: asyncio.Task[None]) -> None:
        self._supervisors.pop(uid, None)
        self._names.pop(uid, None)

    # -- one pod ----------------------------------------------------------------

    async def _supervise(self, pod: Obj, *, after: list[asyncio.Task[None]]) -> None:
        meta = pod["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        try:
            if after:
                await asyncio.gather(*after, return_exceptions=True)
            _kill_leftover(pod)
            restarts = _restart_count(pod)
            env = await self._environment_when_ready(pod)
            container = pod["spec"]["containers"][0]
            argv = _argv(container)
            while True:
                async with self._slots:
                    rc, message = await self._run_once(pod, argv, env, restarts)
                if rc == 0 or pod["spec"].get("restartPolicy", "OnFailure") == "Never":
                    await self._set_terminated(pod, rc, message, restarts)
                    return
                restarts += 1
                delay = min(self._backoff_base * 2 ** (restarts - 1), self._backoff_max)
                await self._status(pod, {
                    "phase": "Running",
                    "containerStatuses": [{
                        "name": container["name"], "ready": False, "restartCount": restarts,
                        "state": {"waiting": {"reason": "CrashLoopBackOff",
                                              "message": f"back-off {delay:.0f}s restarting "
                                                         "failed container"}},
                        "lastState": {"terminated": _terminated(rc, message)},
                    }],
                })
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except errors.NotFound:
            pass  # the pod went away
        except Exception:
            log.exception("POD %s/%s supervisor failed", ns, name)
        finally:
            if uid in self._deleted:
                self._deleted.discard(uid)
                shutil.rmtree(self.pod_dir(ns, name), ignore_errors=True)
                self.socket_path(uid).unlink(missing_ok=True)  # left if its worker was killed

    async def _environment_when_ready(self, pod: Obj) -> dict[str, str]:
        """Like the kubelet: a missing Secret or ConfigMap keeps the container waiting."""
        container = pod["spec"]["containers"][0]
        while True:
            try:
                return await self._environment(pod)
            except _ConfigMissing as e:
                await self._status(pod, {"phase": "Pending", "containerStatuses": [{
                    "name": container["name"], "ready": False,
                    "restartCount": _restart_count(pod),
                    "state": {"waiting": {"reason": "CreateContainerConfigError",
                                          "message": str(e)}}}]})
                await asyncio.sleep(CONFIG_RETRY)

    async def _environment(self, pod: Obj) -> dict[str, str]:
        """The container's env plus the paths its mounts stand for; waits for bound claims."""
        meta = pod["metadata"]
        ns = meta["namespace"]
        d = self.pod_dir(ns, meta["name"])
        d.mkdir(parents=True, exist_ok=True)
        container = pod["spec"]["containers"][0]
        # Like a container, a worker does not inherit cdi serve's proxy settings or
        # importer variables: only what its pod spec says.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("IMPORTER_") and k.lower() not in _PROXY_VARIABLES}
        for e in container.get("env", []):
            env[e["name"]] = await self._env_value(ns, e)
        env.update({
            "IMPORTER_TERMINATION_LOG": str(d / "termination-log"),
            "IMPORTER_METRICS_ADDRESS": "127.0.0.1:0",
            "IMPORTER_METRICS_ADDRESS_FILE": str(d / "metrics-address"),
            "IMPORTER_BLOCK_PATH": str(d / "no-block-device"),
            "IMPORTER_SCRATCH_DIR": str(d / "no-scratch"),
            "IMPORTER_DATA_DIR": str(d / "no-data"),
            # An upload server listens on loopback here, where it is reached through
            # the upload proxy of cdi serve.
            "LISTEN_ADDRESS": "127.0.0.1",
            "LISTEN_PORT": "0",
            "UPLOAD_ADDRESS_FILE": str(d / "upload-address"),
        })
        if _argv(container)[-1] == "importer.uploadserver" and \
                (sock := self._socket_path(meta["uid"])) is not None:
            env["LISTEN_SOCKET"] = str(sock)
        for v in pod["spec"].get("volumes", []):
            if "configMap" in v:
                await self._materialize_config_map(ns, v["configMap"]["name"], d / v["name"])
        secrets = {v["name"]: v["secret"]["secretName"]
                   for v in pod["spec"].get("volumes", []) if "secret" in v}
        optional = {v["name"] for v in pod["spec"].get("volumes", [])
                    if "secret" in v and v["secret"].get("optional")}
        for m in container.get("volumeMounts", []):
            if m["name"] in secrets and m["mountPath"].startswith("/extraheaders/"):
                # Secret extra headers: /extraheaders/<i> in the pod, a private dir here.
                target = d / "extraheaders" / Path(m["mountPath"]).name
                await self._materialize_secret(ns, secrets[m["name"]], target)
                env["IMPORTER_SECRET_EXTRA_HEADERS_DIR"] = str(d / "extraheaders")
            elif m["name"] in secrets:
                # Any other Secret volume (an upload server's /etc/tls): a private dir
                # here, and env values naming files under the mount point follow it.
                target = d / "secrets" / m["name"]
                await self._materialize_secret(ns, secrets[m["name"]], target,
                                               optional=m["name"] in optional)
                prefix = m["mountPath"].rstrip("/") + "/"
                for e in container.get("env", []):
                    value = env.get(e["name"], "")
                    if value.startswith(prefix):
                        env[e["name"]] = str(target / value[len(prefix):])
        config_dirs = {v["name"]: d / v["name"] for v in pod["spec"].get("volumes", [])
                       if "configMap" in v}
        for m in container.get("volumeMounts", []):
            variable = MOUNT_ENV.get(m["mountPath"])
            if variable is not None and m["name"] in config_dirs:
                env[variable] = str(config_dirs[m["name"]])
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        mounts: list[tuple[str, str, bool]] = [
            (m["name"], m["mountPath"], False) for m in container.get("volumeMounts", [])
        ] + [(m["name"], m["devicePath"], True) for m in container.get("volumeDevices", [])]
        for volume, path, block in mounts:
            variable = (DEVICE_ENV if block else MOUNT_ENV).get(path)
            if variable is None or volume not in claims:
                continue
            pv_name = await self._wait_bound(ns, claims[volume], pod)
            env[variable] = str(self._volumes.path(pv_name, block=block))
        return env

    def socket_path(self, uid: str) -> Path:
        """The Unix socket of the upload server of pod UID: short, in a 0700 directory."""
        return self._sockets / (hashlib.sha256(uid.encode()).hexdigest()[:16] + ".sock")

    def _socket_path(self, uid: str) -> Path | None:
        path = self.socket_path(uid)
        if len(os.fsencode(path)) > SOCKET_PATH_MAX:
            log.warning("PODRUNNER data dir too long for a Unix socket (%s): upload servers "
                        "are reached over TCP with mutual TLS only", path)
            return None
        self._sockets.mkdir(mode=0o700, exist_ok=True)
        self._sockets.chmod(0o700)  # also if it was made otherwise
        return path

    async def _env_value(self, namespace: str, var: Obj) -> str:
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            return str(var.get("value", ""))
        try:
            secret = await self._store.get("Secret", ref["name"], namespace)
        except errors.NotFound:
            if ref.get("optional"):
                return ""
            raise _ConfigMissing(f'secret "{ref["name"]}" not found') from None
        data = secret.get("data", {})
        if ref["key"] in data:
            return base64.b64decode(data[ref["key"]]).decode()
        if ref["key"] in secret.get("stringData", {}):
            return str(secret["stringData"][ref["key"]])
        if ref.get("optional"):
            return ""
        raise _ConfigMissing(f'couldn\'t find key {ref["key"]} in Secret {namespace}/{ref["name"]}')

    async def _materialize_config_map(self, namespace: str, name: str, target: Path) -> None:
        try:
            cm = await self._store.get("ConfigMap", name, namespace)
        except errors.NotFound:
            raise _ConfigMissing(f'configmap "{name}" not found') from None
        target.mkdir(parents=True, exist_ok=True)
        for key, value in cm.get("data", {}).items():
            if "/" in key or key.startswith("."):
                continue
            (target / key).write_text(str(value))

    async def _materialize_secret(self, namespace: str, name: str, target: Path, *,
                                  optional: bool = False) -> None:
        target.mkdir(parents=True, exist_ok=True)
        target.chmod(0o700)
        try:
            secret = await self._store.get("Secret", name, namespace)
        except errors.NotFound:
            if optional:
                return  # an optional Secret that does not exist mounts an empty dir
            raise _ConfigMissing(f'secret "{name}" not found') from None
        for key, value in secret.get("data", {}).items():
            if "/" in key or key in (".", ".."):  # dot files are files, like a kubelet's
                continue
            path = target / key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(value))

    async def _wait_bound(self, namespace: str, claim: str, pod: Obj) -> str:
        """Schedule the pod: mark WaitForFirstConsumer claims, wait until bound."""
        marked = False
        while True:
            try:
                pvc = await self._store.get("PersistentVolumeClaim", claim, namespace)
            except errors.NotFound:
                await self._status(pod, {"phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": f'persistentvolumeclaim "{claim}" not found'}]})
                await asyncio.sleep(1)
                continue
            if pvc.get("status", {}).get("phase") == "Bound" and pvc["spec"].get("volumeName"):
                return str(pvc["spec"]["volumeName"])
            if not marked and SELECTED_NODE not in pvc["metadata"].get("annotations", {}):
                await self._store.patch("PersistentVolumeClaim", claim, namespace, {
                    "metadata": {"annotations": {SELECTED_NODE: NODE_NAME}}})
                marked = True
            await asyncio.sleep(0.05)

    async def _run_once(self, pod: Obj, argv: list[str], env: dict[str, str],
                        restarts: int) -> tuple[int, str]:
        meta = pod["metadata"]
        d = self.pod_dir(meta["namespace"], meta["name"])
        for stale in ("termination-log", "metrics-address", "upload-address"):
            (d / stale).unlink(missing_ok=True)
        with (d / "log").open("ab") as logf:
            proc = await asyncio.create_subprocess_exec(
                "setpriv", "--pdeathsig", "TERM", "--", *argv,
                stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                start_new_session=True)
        container = pod["spec"]["containers"][0]
        # With a readiness probe (an upload server) the pod is Ready once it listens.
        probe = "readinessProbe" in container
        try:
            await self._status(pod, {
                "phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1",
                "startTime": pod.get("status", {}).get("startTime") or now(),
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Ready", "status": "False" if probe else "True"}],
                "containerStatuses": [{
                    "name": container["name"], "ready": not probe, "restartCount": restarts,
                    "state": {"running": {"startedAt": now()}},
                }],
            }, annotations={PID_ANNOTATION: str(proc.pid)})
            waiter = asyncio.ensure_future(proc.wait())
            pending = {"metrics-address": METRICS_ANNOTATION}
            if probe:
                pending["upload-address"] = UPLOAD_ANNOTATION
            while not waiter.done() and pending:
                for file, annotation in list(pending.items()):
                    address = _read_address(d / file)
                    if address:
                        del pending[file]
                        ready: dict[str, Any] | None = None
                        published = {annotation: address}
                        if annotation == UPLOAD_ANNOTATION:
                            if "LISTEN_SOCKET" in env:  # listening by now, like the port
                                published[SOCKET_ANNOTATION] = env["LISTEN_SOCKET"]
                            ready = {"conditions": [{"type": "PodScheduled", "status": "True"},
                                                    {"type": "Ready", "status": "True"}],
                                     "containerStatuses": [{
                                         "name": container["name"], "ready": True,
                                         "restartCount": restarts,
                                         "state": {"running": {"startedAt": now()}}}]}
                        await self._status(pod, ready, annotations=published)
                await asyncio.wait({waiter}, timeout=0.05)
            rc = await waiter
        except BaseException:
            # Cancelled, or the pod is gone: the worker must not outlive its supervisor.
            await asyncio.shield(_stop(proc))
            raise
        term = d / "termination-log"
        message = term.read_text() if term.exists() else ""
        if rc != 0 and not message.strip() and \
                container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = _log_tail(d / "log")
        log.info("POD %s/%s exited rc=%d", meta["namespace"], meta["name"], rc)
        return rc, message

    async def _set_terminated(self, pod: Obj, rc: int, message: str, restarts: int) -> None:
        container = pod["spec"]["containers"][0]
        await self._status(pod, {
            "phase": "Succeeded" if rc == 0 else "Failed",
            "conditions": [{"type": "PodScheduled", "status": "True"},
                           {"type": "Ready", "status": "False"}],
            "containerStatuses": [{
                "name": container["name"], "ready": False, "restartCount": restarts,
                "state": {"terminated": _terminated(rc, message)},
            }],
        })

    async def _status(self, pod: Obj, status: dict[str, Any] | None,
                      annotations: dict[str, str] | None = None) -> None:
        meta = pod["metadata"]
        patch: Obj = {}
        if status is not None:
            patch["status"] = status
        if annotations:
            patch["metadata"] = {"annotations": annotations}
        await self._store.patch("Pod", meta["name"], meta["namespace"], patch)


_PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
LOG_TAIL = 2048  # bytes of log used as the message of a failure that wrote none


def _log_tail(path: Path) -> str:
    """The end of a worker's log, as Kubernetes' FallbackToLogsOnError uses it."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - LOG_TAIL))
            lines = f.read().decode(errors="replace").splitlines()[-80:]
    except OSError:
        return ""
    return "\n".join(lines).strip()


def _read_address(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class _ConfigMissing(Exception):
    """A Secret or ConfigMap the container needs does not exist (yet)."""


def _argv(container: Obj) -> list[str]:
    command = list(container.get("command", [])) + list(container.get("args", []))
    if not command:
        raise errors.BadRequest("the container has no command")
    return COMMANDS.get(command[0], [command[0]]) + command[1:]


def _terminated(rc: int, message: str) -> dict[str, Any]:
    return {"exitCode": rc, "reason": "Completed" if rc == 0 else "Error",
            "message": message, "finishedAt": now()}


def _restart_count(pod: Obj) -> int:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    count = int(statuses[0].get("restartCount", 0)) if statuses else 0
    # A pod that was running when cdi serve died starts again: count it.
    return count + 1 if pod.get("status", {}).get("phase") == "Running" else count


def _kill_leftover(pod: Obj) -> None:
    """Stop a worker a killed `cdi serve` left behind (its process group)."""
    pid_text = pod["metadata"].get("annotations", {}).get(PID_ANNOTATION)
    if not pid_text:
        return
    pid = int(pid_text)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"importer" not in cmdline:
        return  # the pid was reused by something else
    log.warning("POD killing leftover worker pid=%d", pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
