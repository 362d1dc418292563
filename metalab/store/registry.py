"""The local SQLite registry: the index of run folders, and the service's tenants, their API keys
(hashed), adapters and their examples.

One file, WAL mode (readers never wait for the writer), foreign keys on, every write in one
transaction (``BEGIN IMMEDIATE``), so a failed request leaves nothing half-written. The schema is
versioned: ``schema_version`` records each applied migration, and opening an older file applies
the missing ones in order; a file from a newer metalab is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from metalab.errors import ConfigError, StorageError

KEY_PREFIX = "mlk_"

#: Migrations in order; migration i brings a file from version i to i + 1. Never edit one that has
#: shipped: append a new one.
MIGRATIONS: list[tuple[str, str]] = [
    ("tenants and hashed API keys", """
        CREATE TABLE tenants (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created TEXT NOT NULL
        );
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            created TEXT NOT NULL,
            revoked TEXT
        );
    """),
    ("adapters and their labelled examples", """
        CREATE TABLE adapters (
            id TEXT PRIMARY KEY,
            tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
            run TEXT NOT NULL,
            name TEXT NOT NULL,
            modality TEXT NOT NULL,
            head TEXT NOT NULL,
            threshold REAL,
            labels TEXT NOT NULL,
            version INTEGER NOT NULL,
            created TEXT NOT NULL,
            updated TEXT NOT NULL
        );
        CREATE INDEX adapters_by_tenant ON adapters(tenant_id, run);
        CREATE TABLE examples (
            id INTEGER PRIMARY KEY,
            adapter_id TEXT NOT NULL REFERENCES adapters(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            text TEXT,
            image BLOB,
            features BLOB NOT NULL,
            added_in INTEGER NOT NULL
        );
        CREATE INDEX examples_by_adapter ON examples(adapter_id, id);
    """),
    ("text adapter options: label names as examples, lexical weight", """
        ALTER TABLE adapters ADD COLUMN names_as_examples INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE adapters ADD COLUMN lexical_weight REAL NOT NULL DEFAULT 0
    """),
    ("an index of run folders", """
        CREATE TABLE runs (
            path TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            algo TEXT NOT NULL,
            data TEXT NOT NULL,
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            summary TEXT NOT NULL
        );
        CREATE INDEX runs_by_updated ON runs(updated)
    """),
]
SCHEMA_VERSION = len(MIGRATIONS)


def default_registry_path() -> Path:
    """``$METALAB_HOME/registry.sqlite`` (default ``~/.metalab/registry.sqlite``)."""
    return Path(os.environ.get("METALAB_HOME", Path.home() / ".metalab")) / "registry.sqlite"


def hash_key(key: str) -> str:
    """SHA-256 of an API key. Keys are 256 random bits, so a fast hash is enough (no brute force)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str


@dataclass
class AdapterRecord:
    id: str
    tenant_id: int
    run: str
    name: str
    modality: str
    head: str
    threshold: float | None
    labels: list[str]
    version: int
    created: str
    updated: str
    examples: int = 0
    names_as_examples: bool = False  #: each label's name (underscores as spaces) is one more example of it
    lexical_weight: float = 0.0  #: weight of the lexical classifier's log-probabilities (0 = none)

    def public(self) -> dict:
        return {"id": self.id, "name": self.name, "modality": self.modality, "head": self.head,
                "threshold": self.threshold, "labels": self.labels, "examples": self.examples,
                "names_as_examples": self.names_as_examples, "lexical_weight": self.lexical_weight,
                "version": self.version, "created": self.created, "updated": self.updated}


@dataclass(frozen=True)
class Example:
    label: str
    text: str | None = None
    image: bytes | None = None  #: the uploaded PNG/JPEG bytes, as sent
    features: bytes = b""  #: the run's input for it (float32 embedding / uint8 image), so a restart re-adapts exactly


class Registry:
    """Thread-safe access to one registry file (one connection per thread, writes serialised)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"Registry folder '{self.path.parent}' cannot be created ({exc.strerror}); pass --db with a writable path.") from None
        self._local = threading.local()
        self._write_lock = threading.Lock()
        try:
            self._migrate()
        except (sqlite3.OperationalError, StorageError) as exc:  # read-only file or folder, disk full, locked for over 30 s
            why = getattr(exc, "reason", exc)
            raise ConfigError(f"Registry '{self.path}' cannot be written ({why}); pass --db with a writable path "
                              "(or set METALAB_HOME).") from None

    # ---- connections and transactions ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.DatabaseError as exc:
                raise ConfigError(f"Registry '{self.path}' is not a usable SQLite file ({exc}); pass --db with another path.") from None
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")  # durable with WAL: a crash loses no committed write
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything in it lands, or nothing does. A full, read-only or
        failing disk is a :class:`StorageError` (nothing was written)."""
        conn = self._connect()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:  # (SQLite may have rolled back already, on a full disk)
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise self._storage_error(exc) from None

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self._connect().execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            raise self._storage_error(exc) from None

    def _storage_error(self, exc: sqlite3.OperationalError) -> Exception:
        """The user's sentence for SQLite's failure: a :class:`StorageError` when the disk is at fault
        (full, read-only, I/O error, locked too long), else the error itself (a bug, not the disk)."""
        text = str(exc)
        disk = ("full", "readonly", "read-only", "disk i/o", "locked", "unable to open", "no such file")
        if not any(word in text.lower() for word in disk):
            return exc
        fix = ("another process has held it for over 30 s; retry when it is done" if "locked" in text.lower()
               else "free disk space or make the file writable, then retry")
        error = StorageError(f"Registry '{self.path}' cannot be written ({text}); nothing was changed. {fix[0].upper()}{fix[1:]}.")
        error.reason = text
        return error

    def schema_version(self) -> int:
        conn = self._connect()
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name='schema_version'").fetchone():
            return 0
        return conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied TEXT NOT NULL)")
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise ConfigError(f"Registry '{self.path}' has schema version {current}, newer than this metalab's "
                              f"{SCHEMA_VERSION}; upgrade metalab or pass --db with another file.")
        for version in range(current, SCHEMA_VERSION):
            description, sql = MIGRATIONS[version]
            with self._write() as conn:
                for statement in filter(str.strip, sql.split(";")):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?, ?, ?)", (version + 1, description, _now()))

    # ---- tenants and keys ----------------------------------------------------------------------

    def create_key(self, tenant: str) -> str:
        """A new API key for ``tenant`` (created if new). The key is returned once; only its hash is stored."""
        tenant = tenant.strip()
        if not tenant or len(tenant) > 100:
            raise ConfigError("Tenant names must be 1 to 100 characters; pass a short name such as 'acme'.")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO tenants (name, created) VALUES (?, ?)", (tenant, _now()))
            tenant_id = conn.execute("SELECT id FROM tenants WHERE name = ?", (tenant,)).fetchone()[0]
            conn.execute("INSERT INTO api_keys (tenant_id, key_hash, prefix, created) VALUES (?, ?, ?, ?)",
                         (tenant_id, hash_key(key), key[:12], _now()))
        return key

    def list_keys(self) -> list[dict]:
        rows = self._read("SELECT t.name AS tenant, k.prefix, k.created, k.revoked FROM api_keys k "
                          "JOIN tenants t ON t.id = k.tenant_id ORDER BY t.name, k.id")
        return [dict(r) for r in rows]

    def revoke_key(self, prefix: str) -> int:
        """Revoke every live key starting with ``prefix`` (at least 8 characters); returns how many."""
        if len(prefix) < 8:
            raise ConfigError("Give at least the first 8 characters of the key to revoke (as `metalab keys list` shows them).")
        prefix = prefix[:12]
        with self._write() as conn:
            return conn.execute("UPDATE api_keys SET revoked = ? WHERE revoked IS NULL AND substr(prefix, 1, ?) = ?",
                                (_now(), len(prefix), prefix)).rowcount

    def tenant_for_key(self, key: str) -> Tenant | None:
        rows = self._read("SELECT t.id, t.name FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
                          "WHERE k.key_hash = ? AND k.revoked IS NULL", (hash_key(key),))
        return Tenant(rows[0]["id"], rows[0]["name"]) if rows else None

    # ---- adapters ------------------------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> AdapterRecord:
        data = dict(row)
        data["labels"] = json.loads(data["labels"])
        data["names_as_examples"] = bool(data["names_as_examples"])
        return AdapterRecord(**data)

    def create_adapter(self, tenant: Tenant, run: str, name: str, modality: str, head: str,
                       threshold: float | None, labels: list[str], examples: list[Example],
                       names_as_examples: bool = False, lexical_weight: float = 0.0) -> AdapterRecord:
        adapter_id = "ad_" + secrets.token_hex(8)
        now = _now()
        with self._write() as conn:
            conn.execute("INSERT INTO adapters (id, tenant_id, run, name, modality, head, threshold, labels, version, "
                         "created, updated, names_as_examples, lexical_weight) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?)",
                         (adapter_id, tenant.id, run, name, modality, head, threshold, json.dumps(labels), now, now,
                          int(names_as_examples), float(lexical_weight)))
            self._insert_examples(conn, adapter_id, examples, 1)
        return self.get_adapter(tenant, run, adapter_id)

    @staticmethod
    def _insert_examples(conn: sqlite3.Connection, adapter_id: str, examples: list[Example], version: int) -> None:
        conn.executemany("INSERT INTO examples (adapter_id, label, text, image, features, added_in) VALUES (?, ?, ?, ?, ?, ?)",
                         [(adapter_id, e.label, e.text, e.image, e.features, version) for e in examples])

    def add_examples(self, tenant: Tenant, run: str, adapter_id: str, labels: list[str], examples: list[Example],
                     expected_version: int) -> AdapterRecord | None:
        """Append examples and bump the version, only if the adapter is still at ``expected_version``
        (``None`` if it is gone or changed meanwhile: the caller retries)."""
        with self._write() as conn:
            updated = conn.execute("UPDATE adapters SET version = version + 1, labels = ?, updated = ? "
                                   "WHERE id = ? AND tenant_id = ? AND run = ? AND version = ?",
                                   (json.dumps(labels), _now(), adapter_id, tenant.id, run, expected_version)).rowcount
            if not updated:
                return None
            self._insert_examples(conn, adapter_id, examples, expected_version + 1)
        return self.get_adapter(tenant, run, adapter_id)

    def get_adapter(self, tenant: Tenant, run: str, adapter_id: str) -> AdapterRecord | None:
        """The adapter if it exists *and* belongs to ``tenant`` and this run (else ``None``: 404)."""
        rows = self._read("SELECT a.*, (SELECT COUNT(*) FROM examples e WHERE e.adapter_id = a.id) AS examples "
                          "FROM adapters a WHERE a.id = ? AND a.tenant_id = ? AND a.run = ?", (adapter_id, tenant.id, run))
        return self._record(rows[0]) if rows else None

    def list_adapters(self, tenant: Tenant, run: str) -> list[AdapterRecord]:
        """The tenant's adapters on this run, oldest first (insertion order: ``created`` has
        one-second resolution, so two adapters made in the same second would tie)."""
        rows = self._read("SELECT a.*, (SELECT COUNT(*) FROM examples e WHERE e.adapter_id = a.id) AS examples "
                          "FROM adapters a WHERE a.tenant_id = ? AND a.run = ? ORDER BY a.rowid", (tenant.id, run))
        return [self._record(r) for r in rows]

    def examples(self, adapter_id: str, version: int) -> list[Example]:
        """The adapter's examples as of ``version`` (examples are only ever appended, each tagged with
        the version that added it, so a reader racing an update still gets a consistent set)."""
        rows = self._read("SELECT label, text, image, features FROM examples WHERE adapter_id = ? AND added_in <= ? "
                          "ORDER BY id", (adapter_id, version))
        return [Example(r["label"], r["text"], r["image"], r["features"]) for r in rows]

    def delete_adapter(self, tenant: Tenant, run: str, adapter_id: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM adapters WHERE id = ? AND tenant_id = ? AND run = ?",
                                (adapter_id, tenant.id, run)).rowcount > 0

    def count_adapters(self, run: str) -> int:
        return self._read("SELECT COUNT(*) FROM adapters WHERE run = ?", (run,))[0][0]

    # ---- the index of run folders (metalab.store.runs fills it) --------------------------------

    def upsert_run(self, path: str, name: str, algo: str, data: str, summary: dict) -> None:
        """Index the run folder at ``path`` (absolute), or update its row."""
        now = _now()
        with self._write() as conn:
            conn.execute("INSERT INTO runs (path, name, algo, data, created, updated, summary) VALUES (?, ?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT(path) DO UPDATE SET name = excluded.name, algo = excluded.algo, "
                         "data = excluded.data, updated = excluded.updated, summary = excluded.summary",
                         (path, name, algo, data, now, now, json.dumps(summary)))

    def runs(self) -> list[dict]:
        """Every indexed run, most recently updated first; ``summary`` as a dict."""
        rows = self._read("SELECT * FROM runs ORDER BY updated DESC, rowid DESC")
        return [{**dict(r), "summary": json.loads(r["summary"])} for r in rows]

    def forget_runs(self, paths: list[str]) -> int:
        """Drop these runs from the index (their folders are not touched); returns how many."""
        with self._write() as conn:
            return sum(conn.execute("DELETE FROM runs WHERE path = ?", (p,)).rowcount for p in paths)
