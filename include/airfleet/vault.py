"""The vault: secrets stored as envelopes (see :mod:`airfleet.crypto`) in the store.

Only ciphertext reaches the database. Sealing needs only the public key, so a client can seal a
kubeconfig or an SSH key on its own machine and put the envelope in a DAG conf; the flow moves
it into the vault and the spec keeps the vault id.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from airfleet import config, crypto
from airfleet.errors import VaultError
from airfleet.store import Store


def sealed_secret_id(envelope: str) -> str:
    """The same envelope always lands under the same id, so a re-run stores no duplicate."""
    return "vlt_" + hashlib.sha256(envelope.encode()).hexdigest()[:32]


_STORES: dict[str, Store] = {}


def _forget_stores() -> None:
    # A forked child (a task runner, a Celery pool process) must neither use nor close its
    # parent's pooled connections: SQLAlchemy's engine.dispose(close=False) after os.fork().
    for store in _STORES.values():
        store.engine.dispose(close=False)
    _STORES.clear()


os.register_at_fork(after_in_child=_forget_stores)


class Vault:
    def __init__(self, store: Store, keys_dir: Path):
        self.store = store
        self.keys_dir = Path(keys_dir)

    @classmethod
    def default(cls) -> Vault:
        """The vault of this process's settings, on one store per database for the process
        (a store holds an engine and its connection pool): a store for each read cost a new
        database connection each, and a health check reads a secret for each cluster."""
        url = config.database_url()
        store = _STORES.get(url) or _STORES.setdefault(url, Store(url))
        return cls(store, config.keys_dir())

    def put(self, plaintext: bytes, description: str = "") -> str:
        """Seal ``plaintext`` with the vault's public key and store it; return its id."""
        public = crypto.load_public_key(self.keys_dir)
        envelope = crypto.seal(public, plaintext)
        secret_id = "vlt_" + secrets.token_hex(16)
        self.store.put_secret(secret_id, crypto.key_id(public), envelope, description)
        return secret_id

    def put_sealed(self, envelope: str, description: str = "") -> str:
        """Store an envelope sealed by a client; it must open with this vault's key (checked
        now, so a wrong key fails the flow before anything is built on it)."""
        self.open_sealed(envelope)
        secret_id = sealed_secret_id(envelope)
        self.store.put_secret(secret_id, crypto.envelope_key_id(envelope), envelope, description)
        return secret_id

    def open_sealed(self, envelope: str) -> bytes:
        """The plaintext of an envelope not (yet) stored: a flow checking its input."""
        return crypto.unseal(crypto.load_private_key(self.keys_dir), envelope)

    def get(self, secret_id: str) -> bytes:
        row = self.store.get_secret(secret_id)
        return crypto.unseal(self._private_key_for(row.key_id), row.envelope)

    def rotate(self) -> tuple[str, int]:
        """New key pair, then re-wrap every stored secret; return ``(new key id, count)``.

        Safe to run again after a crash: envelopes still under an older key are re-wrapped
        with that key's retired copy (``.old``)."""
        crypto.rotate_keys(self.keys_dir)
        return self.rewrap_all()

    def rewrap_all(self) -> tuple[str, int]:
        new_public = crypto.load_public_key(self.keys_dir)
        new_id = crypto.key_id(new_public)
        count = 0
        for secret_id in self.store.secret_ids():
            row = self.store.get_secret(secret_id)
            if row.key_id == new_id:
                continue
            envelope = crypto.rewrap(self._private_key_for(row.key_id), new_public, row.envelope)
            self.store.replace_envelope(secret_id, new_id, envelope)
            count += 1
        return new_id, count

    def _private_key_for(self, key_id: str):
        current = crypto.load_private_key(self.keys_dir)
        if crypto.key_id(current.public_key()) == key_id:
            return current
        try:
            return crypto.load_old_private_key(self.keys_dir, key_id)
        except VaultError:
            raise VaultError(
                f"secret sealed for key {key_id}, which this vault no longer holds "
                f"(current key {crypto.key_id(current.public_key())}); restore that key's "
                ".old files to read it") from None
