"""``python -m importer.uploadserver`` / ``cdi-uploadserver``: accept one upload, then exit.

KubeVirt CDI runs one upload server per upload target volume: it takes one
upload over HTTPS, writes it to the volume the way an import would, and exits
0.  This is that server.  The data takes the import worker's paths (raw and
compressed raw straight onto the volume, sparse; qcow2/vmdk/vdi/vhd/vhdx,
possibly compressed, through scratch space and qemu-img; tar archives
extracted), with the worker's settings, processor and termination message.
Beyond CDI it can continue an interrupted raw upload (below).

Environment
-----------
=============================  ==============================================================
``IMPORTER_DATA_DIR``          filesystem volume; the image is ``<dir>/disk.img`` (``/data``)
``IMPORTER_BLOCK_PATH``        block volume; if it exists the target is block, written at its
                               exact size (``/dev/cdi-block-volume``)
``IMPORTER_SCRATCH_DIR``       scratch space for images that need conversion (``/scratch``)
``IMPORTER_TERMINATION_LOG``   where the termination message goes (``/dev/termination-log``)
``UPLOAD_IMAGE_SIZE``          the volume's requested size, a quantity (``10Gi``) or bytes
``FILESYSTEM_OVERHEAD``        fraction of a filesystem volume reserved, ``0``..``1`` (``0``)
``PREALLOCATION``              ``true``: allocate the whole disk (``false``)
``CACHE_MODE``                 ``TRYNONE``: qemu-img writes with O_DIRECT if possible
``OWNER_UID``                  label of the progress metrics (``""``)
``LISTEN_ADDRESS``             address to listen on (``0.0.0.0``)
``LISTEN_PORT``                port; ``0`` picks a free one (``8443``)
``UPLOAD_ADDRESS_FILE``        if set, the bound ``host:port`` is written there once listening
``LISTEN_SOCKET``              also listen on this Unix socket, plain HTTP, for clients on
                               this machine running as our user (below); its directory
                               must be ours and mode 0700; at most 107 bytes
``TLS_CERT_FILE``,             the server's certificate (chain) and key, PEM.  Without them the
``TLS_KEY_FILE``               server only starts on a loopback address (plain HTTP)
``CLIENT_CERT_FILE``           CA bundle; when set, every client must present a certificate
                               it signed (mutual TLS; without one the handshake fails)
``CLIENT_NAME``                with ``CLIENT_CERT_FILE``: the client certificate must carry
                               this CN or DNS name, else 401
                               (CDI: ``client.upload-server.cdi.kubevirt.io``)
``TLS_MIN_VERSION``            ``VersionTLS12`` (default) or ``VersionTLS13``
``DEADLINE``                   RFC 3339 time; if no upload completed by then the server stops
                               accepting and exits 1 (an upload under way may finish first)
``UPLOAD_STATE_FILE``          where the resume state is kept (default: ``<data dir>/
                               .upload-state.json``; on block ``<scratch dir>/...``; none if
                               block without scratch: then uploads are not resumable)
``UPLOAD_LINGER_SECONDS``      after completing, keep answering (409) this long before exiting
``UPLOAD_CLONE``               ``true``: clone mode, the server takes one sparse clone stream
                               (below) and nothing else; no scratch is used (``false``)
``IMPORTER_METRICS_ADDRESS``,  opt-in extra metrics endpoint, as for the import worker;
``IMPORTER_METRICS_ADDRESS_``  ``GET /metrics`` on the upload port always works
``FILE``
=============================  ==============================================================

A bad value exits 1 with ``Invalid settings: <VARIABLE>: <reason>``, also
written to the termination log.  CDI's
``DESTINATION`` is not read: the ``IMPORTER_*`` paths replace it, as for the
import worker, so the pod runner wires mounts the same way for both.
``TLS_CIPHERS`` is not read (Python's defaults apply).  Unlike CDI, which
verifies a client certificate only if one is given and answers 401 without
one, a server with ``CLIENT_CERT_FILE`` refuses the TLS handshake itself, so
its pod's readiness probe is a TCP probe of the port.

Endpoints
---------
``POST /v1beta1/upload``, ``/v1alpha1/upload``
    the body is the image.  200 once it is written, converted, resized and fsynced.
``POST /v1beta1/upload-async``, ``/v1alpha1/upload-async``
    200 once the body is received and validated (checksum; for a convertible
    image its header, by qemu-img info); conversion and resizing go on after.
``POST /v1beta1/upload-form[-async]``, ``/v1alpha1/upload-form[-async]``
    ``multipart/form-data``; the image is the part named ``file`` (streamed).
``POST /v1beta1/upload-archive[-async]``, ``/v1alpha1/upload-archive[-async]``
    a tar (possibly gz/xz/zst/bz2), extracted onto a filesystem volume.
``HEAD`` on the async endpoints: 200 (a probe).  ``GET /healthz``: 200 ``OK``.
``GET /metrics``: the import worker's metrics (bytes read = body bytes received,
bytes expected = Content-Length).  ``GET /v1beta1/upload-offset``: resume, below.

A POST needs ``Content-Length`` or ``Transfer-Encoding: chunked`` (else 411).
An optional ``X-Checksum: <md5|sha1|sha256|sha512>:<hex>`` is checked over the
uploaded file's bytes (the body, or the form's ``file`` part).
``Expect: 100-continue`` is honoured: a refused upload is answered before its body.
Otherwise a refused upload is answered after reading at most 16 MiB of its body, and
the connection is then closed gracefully (our side first, then what the client still
sends is read and dropped for up to 5 s), so a client still sending gets the answer,
not a connection reset.

Status codes (``text/plain`` unless noted):

=====  =========================================================================================
200    upload complete (sync) or received and validated (async); empty body
400    ``Saving stream failed: effective image size is larger than the reported available
       storage: <reason>`` (does not fit, or ENOSPC); ``Saving stream failed: <reason>`` for a
       bad image (qemu-img refused it, backing or data file, damaged compression, unsafe
       archive, ``checksum validation failed: checksum mismatch: expected a:x, calculated
       a:y``, malformed form or body, connection cut); a bad ``X-Checksum``, offset,
       Content-Length or form Content-Type; archive endpoint on a block volume
401    ``CLIENT_NAME`` set and the client certificate does not carry it
404    unknown path; 405 wrong method on an upload path
409    ``Upload already complete``; or, JSON ``{"offset": M, "complete": false, "message":
       "offset mismatch"}``, when ``?offset=N`` is not the durable offset M
411    neither Content-Length nor chunked; 501 a Transfer-Encoding other than chunked
500    ``Saving stream failed: scratch space required and none found``; ``Saving stream failed:
       internal error, check the upload server log`` for anything else (details in the log)
503    ``Upload already in progress``; ``The upload deadline has passed``
=====  =========================================================================================

After any failure the volume holds nothing half-written (image removed or
block volume discarded, archive directory emptied, scratch removed), except
the durable part of an interrupted resumable upload, and the server takes a
new upload.  If an async upload fails after its 200, the server exits 1 with
the import worker's ``Unable to process data: ...`` message.

Exit codes and termination message
----------------------------------
0: ``{"message": "Upload Complete", "scratchSpaceRequired": false,
"preallocationApplied": <bool>}``.  1: the deadline passed (CDI's
``{"message": "Deadline Passed", "deadlinePassed": true}``), bad settings
(``Invalid settings: ...``), or an async upload failed after its 200.

Local socket
------------
With ``LISTEN_SOCKET`` the server listens on a Unix socket as well as on its
TCP port, and serves the same routes there in plain HTTP; both listeners
share the one upload (a second one gets 503 whichever way it comes).  The
socket is created 0600, a stale socket at the path (a killed server's) is
replaced, anything else there is an error, and the socket is removed on exit.
Its directory must belong to our user with no group or other permissions, or
the server does not start; a connection whose peer (``SO_PEERCRED``) runs as
another user (root aside) is closed unanswered.  ``CLIENT_NAME`` does not
apply to it: the file system, not a certificate, says who the client is.
``cdi serve`` uses it for the upload proxy and clone sources, which run as the
same user (``docs/security.md``, local sockets); on Kubernetes only the TCP
port with mutual TLS is used.

Resumable uploads
-----------------
For a raw, uncompressed image sent to ``upload`` or ``upload-async`` (not form
or archive), the server records in the state file how many bytes of the
request body are durably on the volume: it fsyncs and records about once a
second while receiving, and once more when the connection drops.  The file
survives a restart or crash (kill -9) of the server.

``GET /v1beta1/upload-offset`` -> 200 ``{"offset": N, "complete": false,
"inProgress": false}`` (JSON).  ``N`` bytes are durable (0: nothing to
continue).  ``inProgress`` is true while an upload request is being received
or processed; after a dropped connection wait until it is false (the server
notices the drop when its next read fails) before continuing.  After a
completed upload, ``complete`` is true and ``offset`` the size of the body
(until the server exits).

``POST /v1beta1/upload?offset=N`` (or ``upload-async``) with the body's bytes
from ``N`` on continues the upload.  ``N`` must equal the server's offset,
else 409 with the expected offset in the JSON body (``offset=0`` is accepted
only when nothing is recorded); an offset on another endpoint is a 400.
Content-Length, if given, is the length of the remaining part.  Bytes the
server had received past ``N`` but not made durable are simply sent again.
An ``X-Checksum`` covers the whole image from byte 0: the server reads the
first ``N`` bytes back from the volume to compute it.  A POST without
``offset`` starts again from byte 0 and drops the recorded state.

Only a dropped connection keeps the data: any other failure of a continued
upload (checksum mismatch, too large, ...) removes it and the state.
Compressed or convertible images, form and archive uploads record nothing:
after a failure their data is removed and the client starts again from byte
0.  The state file is removed when the upload completes.

Clone mode
----------
With ``UPLOAD_CLONE=true`` the server is the target of a host-assisted clone:
it takes ``POST /v1beta1/upload`` with ``x-cdi-content-type: sparse-clone``,
whose body is the sparse clone stream of ``importer.clonesource`` (format in
``importer.upload.clone`` and ``docs/clone.md``), and refuses anything else
with 400 (an upload, another endpoint, ``?offset``, CDI's snappy
``filesystem-clone``/``blockdevice-clone``); a server not in clone mode
refuses a ``sparse-clone`` POST with 400.  ``CLIENT_NAME`` is then the clone
source's identity.  The stream is written at its offsets, sparse (holes stay
holes; on a block volume the rest is discarded), onto ``disk.img`` grown to
the declared size or onto the block volume, either way round; 400 with the
capacity text above if the size exceeds the volume, 400 ``Saving stream
failed: malformed clone stream: <reason>`` for a bad stream (nothing is kept).
A new clone POST after a failed or dropped one starts again from byte 0.  Exit
0: ``{"message": "Clone Complete", "preallocationApplied": <bool>}``.
"""

from __future__ import annotations

import logging
import signal
import sys

from importer import errors
from importer.__main__ import write_termination
from importer.upload import config, server

log = logging.getLogger("importer.uploadserver")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"terminated by signal {signum}")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    termination_log = config.termination_log_from_env()
    try:
        cfg = config.from_env()
        termination_log = cfg.importer.termination_log
        code, message = server.serve(cfg)
    except errors.SettingsError as e:
        log.error("SETTINGS %s", e)
        code, message = 1, f"Invalid settings: {e}"
        print(message, file=sys.stderr)
    write_termination(termination_log, message)
    print(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
