"""The embedded adapter of the object store port: SQLite, for ``cdi serve``.

``SQLiteStore`` (``store``) is the entry point; ``db`` holds the SQLite file,
``writes`` the Kubernetes write rules, ``history`` the watch events,
``selectors`` and ``mergepatch`` the label selector and merge patch formats.
"""

from cdi.backends.embedded.db import DatabaseDamaged, DatabaseInUse
from cdi.backends.embedded.store import DEFAULT_HISTORY_SIZE, SQLiteStore, StoreClosed

__all__ = ["DEFAULT_HISTORY_SIZE", "DatabaseDamaged", "DatabaseInUse", "SQLiteStore",
           "StoreClosed"]
