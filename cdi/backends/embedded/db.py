"""The embedded store's SQLite file: settings, schema and row operations.

``cdi serve`` keeps every object in one SQLite database so a single process
needs no etcd and no Kubernetes, and must lose no acknowledged write when it
is killed.  Hence:

- WAL journal with ``synchronous=FULL``: a commit returns only after the WAL
  is synced, so an acknowledged write survives ``kill -9`` and power loss;
- ``quick_check`` on open: a file damaged outside SQLite's care (a torn copy,
  a truncated or overwritten file, a bad disk) is refused with
  ``DatabaseDamaged`` before anything is read from it;
- ``locking_mode=EXCLUSIVE``: the serving process holds the file for its
  lifetime.  Watches are fed from memory, so a second writer would change
  objects behind their back; a second opener fails at once instead;
- one ``objects`` table keyed by (kind, namespace, name), with the uid unique
  and indexed, plus an ``owners`` table (owner uid -> dependent uid) for
  cascading deletion, and a one-row ``counter`` with the last
  resourceVersion, so deleting the newest object never moves it backwards.

A ``Database`` is used from one thread only (the store's database thread);
nothing here is async.  Callers group writes with ``transaction()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL UNIQUE,
    resource_version INTEGER NOT NULL,
    document TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS owners (
    owner_uid TEXT NOT NULL,
    uid TEXT NOT NULL,
    PRIMARY KEY (owner_uid, uid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS owners_by_dependent ON owners (uid);
CREATE TABLE IF NOT EXISTS counter (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    resource_version INTEGER NOT NULL
);
INSERT OR IGNORE INTO counter VALUES (0, 0);
"""


class DatabaseInUse(RuntimeError):
    """Another process has the database open."""


class DatabaseDamaged(RuntimeError):
    """The database file is not a sound SQLite database (torn, truncated or overwritten)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path} is damaged ({reason}); nothing was served from it. Restore it from a "
            f"backup, or move it aside to start with an empty state")


@dataclasses.dataclass(frozen=True, order=True)
class Key:
    kind: str
    namespace: str  # "" for cluster-scoped kinds
    name: str


class Database:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, path: Path) -> Database:
        """Open (creating if needed) the database at ``path``."""
        conn = sqlite3.connect(path, isolation_level=None, timeout=0.2)
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise RuntimeError(f"{path}: cannot use WAL journal mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            # Every page's structure, before anything is read from it (milliseconds
            # for thousands of objects); a damaged file is refused, never served.
            problems = [" ".join(str(row[0]).split())
                        for row in conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise DatabaseDamaged(path, "; ".join(problems))
            db = cls(conn)
            with db.transaction():
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(f"{path}: schema version {version} is newer than "
                                       f"this program's ({SCHEMA_VERSION})")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.OperationalError as e:
            conn.close()
            if "locked" in str(e):
                raise DatabaseInUse(f"{path} is in use by another process") from e
            raise
        except sqlite3.DatabaseError as e:  # "file is not a database", "malformed", ...
            conn.close()
            raise DatabaseDamaged(path, str(e)) from e
        except BaseException:
            conn.close()
            raise
        return db

    def close(self) -> None:
        self._conn.close()

    def pragma(self, name: str) -> Any:
        return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A write transaction: committed (and synced) on success, else rolled back."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def resource_version(self) -> int:
        row = self._conn.execute("SELECT resource_version FROM counter WHERE id = 0").fetchone()
        return int(row[0])

    def set_resource_version(self, rv: int) -> None:
        self._conn.execute("UPDATE counter SET resource_version = ? WHERE id = 0", (rv,))

    def get(self, key: Key) -> Obj | None:
        row = self._conn.execute(
            "SELECT document FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
            (key.kind, key.namespace, key.name)).fetchone()
        return _load(row[0]) if row else None

    def by_uid(self, uid: str) -> Obj | None:
        row = self._conn.execute("SELECT document FROM objects WHERE uid = ?", (uid,)).fetchone()
        return _load(row[0]) if row else None

    def list_kind(self, kind: str, namespace: str | None) -> list[Obj]:
        """Objects of ``kind`` (in ``namespace`` unless None), by namespace and name."""
        if namespace is None:
            rows = self._conn.execute(
                "SELECT document FROM objects WHERE kind = ? ORDER BY namespace, name", (kind,))
        else:
            rows = self._conn.execute(
                "SELECT document FROM objects WHERE kind = ? AND namespace = ? ORDER BY name",
                (kind, namespace))
        return [_load(document) for (document,) in rows]

    def dependents(self, owner_uid: str) -> list[Obj]:
        """Objects whose ownerReferences name ``owner_uid``."""
        rows = self._conn.execute(
            "SELECT o.document FROM owners w JOIN objects o ON o.uid = w.uid "
            "WHERE w.owner_uid = ? ORDER BY o.kind, o.namespace, o.name", (owner_uid,))
        return [_load(document) for (document,) in rows]

    def put(self, key: Key, obj: Obj) -> None:
        """Insert or overwrite the object at ``key`` and its owner references."""
        meta = obj["metadata"]
        uid = meta["uid"]
        self._conn.execute(
            "INSERT INTO objects (kind, namespace, name, uid, resource_version, document) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, namespace, name) DO UPDATE SET "
            "uid = excluded.uid, resource_version = excluded.resource_version, "
            "document = excluded.document",
            (key.kind, key.namespace, key.name, uid, int(meta["resourceVersion"]), dump(obj)))
        self._conn.execute("DELETE FROM owners WHERE uid = ?", (uid,))
        owners = {ref["uid"] for ref in meta.get("ownerReferences") or ()}
        self._conn.executemany("INSERT INTO owners (owner_uid, uid) VALUES (?, ?)",
                               [(owner, uid) for owner in sorted(owners)])

    def delete(self, key: Key, uid: str) -> None:
        self._conn.execute("DELETE FROM objects WHERE kind = ? AND namespace = ? AND name = ?",
                           (key.kind, key.namespace, key.name))
        self._conn.execute("DELETE FROM owners WHERE uid = ?", (uid,))


def dump(obj: Obj) -> str:
    """``obj`` as compact JSON; ``ValueError``/``TypeError`` if it is not JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _load(document: str) -> Obj:
    obj: Obj = json.loads(document)
    return obj
