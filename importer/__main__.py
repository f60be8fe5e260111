"""``python -m importer`` / ``cdi-importer``: one import, then exit.

This is the only place where errors become exit codes and the termination
message, following CDI's contract: exit 0 with a JSON message on success (and
when scratch space is needed, or the checksum did not match: both are decisions
for the controller, not reasons for the pod to restart); exit 1 with plain text
("Unable to ...") on failure.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from importer import errors, progress, settings, sources, units
from importer.processor import Processor
from importer.target import Target

log = logging.getLogger("importer")

MAX_MESSAGE = 4096


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"terminated by signal {signum}")


def write_termination(path: Path, message: str) -> None:
    """Write the termination message (the pod's, or a file the embedded runner reads)."""
    text = message[:MAX_MESSAGE]
    # Outside a pod /dev/termination-log does not exist; never create files in /dev.
    if path.exists() or (path.parent.is_dir() and path.parent != Path("/dev")):
        try:
            path.write_text(text)
        except OSError as e:
            log.warning("TERMINATION-LOG %s not written: %s", path, e)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        s = settings.from_env()
    except errors.SettingsError as e:
        log.error("SETTINGS %s", e)
        message = f"Invalid settings: {e}"
        print(message, file=sys.stderr)
        # The contract could not be read, but where the message goes usually can.
        path = os.environ.get("IMPORTER_TERMINATION_LOG") or "/dev/termination-log"
        write_termination(Path(path), message)
        return 1
    code, message = run(s)
    write_termination(s.termination_log, message)
    print(message)
    return code


def run(s: settings.Settings) -> tuple[int, str]:
    """Run one import; returns (exit code, termination message)."""
    started = time.monotonic()
    prog = progress.Progress(s.owner_uid)
    server = None
    labels: dict[str, str] = {}
    try:
        if s.metrics_address:
            server = progress.serve(prog, s.metrics_address, s.metrics_address_file)
        target = Target.from_settings(s)
        source = sources.open_source(s, prog)
        try:
            processor = Processor(source, settings=s, target=target, progress=prog)
            processor.run()
            # A registry image's KUBEVIRT_IO_ variables become PVC labels (CDI's rule);
            # the controller reads them from the termination message.
            labels = dict(getattr(source, "labels", dict)())
        finally:
            source.close()
    except errors.ScratchSpaceRequired as e:
        log.info("SCRATCH required: %s", e)
        return 0, json.dumps({"scratchSpaceRequired": True, "message": str(e)})
    except errors.ChecksumMismatch as e:
        log.error("CHECKSUM %s", e)
        return 0, json.dumps({"message": e.termination_message()})
    except errors.Error as e:
        log.error("FAILED %s", e.termination_message())
        return 1, e.termination_message()
    except Exception as e:
        log.exception("FAILED unexpected error")
        return 1, f"Unable to process data: {type(e).__name__}: {e}"
    finally:
        if server is not None:
            # The server thread is a daemon; closing the socket is enough, and
            # shutdown() would wait out its 0.5 s poll interval.
            server.server_close()
    elapsed = time.monotonic() - started
    log.info("COMPLETE seconds=%.2f read=%s", elapsed, units.humanize(prog.bytes_read))
    result: dict[str, object] = {
        "message": "Import Complete",
        "scratchSpaceRequired": False,
        "preallocationApplied": bool(s.preallocation),
    }
    if labels:
        result["labels"] = labels
    return 0, json.dumps(result)


if __name__ == "__main__":
    sys.exit(main())
