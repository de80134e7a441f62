"""The vault (airfleet.vault.Vault): envelopes in the store, rotation, and no plaintext at rest.

RSA-4096 generation takes about a second, so key pairs are made once per module and copied
into each test's AIRFLOW_HOME.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, text, update

from airfleet import config, crypto
from airfleet.errors import NotFound, VaultError
from airfleet.store import Store
from airfleet.store.tables import SecretRow
from airfleet.vault import Vault, sealed_secret_id


@pytest.fixture(scope="module")
def vault_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("vault") / "keys"
    crypto.init_keys(directory)
    return directory


@pytest.fixture(scope="module")
def foreign_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another vault's key pair."""
    directory = tmp_path_factory.mktemp("foreign") / "keys"
    crypto.init_keys(directory)
    return directory


@pytest.fixture
def store(airfleet_home: Path):
    store = Store()  # AIRFLEET_DATABASE_URL: a SQLite file inside airfleet_home
    assert store.url == f"sqlite:///{airfleet_home / 'airfleet.db'}"
    store.migrate()
    yield store
    store.dispose()


@pytest.fixture
def vault(airfleet_home: Path, store: Store, vault_keys: Path) -> Vault:
    keys = config.keys_dir()
    assert keys == airfleet_home / "keys"
    shutil.copytree(vault_keys, keys)
    return Vault(store, keys)


def current_key_id(vault: Vault) -> str:
    return crypto.key_id(crypto.load_public_key(vault.keys_dir))


def secret_rows(store: Store) -> dict[str, tuple[str, str]]:
    with store.session() as s:
        return {r.id: (r.key_id, r.envelope) for r in s.scalars(select(SecretRow))}


def test_put_then_get_returns_the_plaintext(vault: Vault, store: Store):
    plaintext = b"-----BEGIN OPENSSH PRIVATE KEY-----\n\x00\xffbinary\n"

    secret_id = vault.put(plaintext, description="ssh key of alpha")

    assert secret_id.startswith("vlt_") and len(secret_id) == 36
    assert vault.get(secret_id) == plaintext
    [(key_id, envelope)] = secret_rows(store).values()
    assert key_id == current_key_id(vault)
    assert crypto.envelope_key_id(envelope) == key_id
    assert store.get_secret(secret_id).description == "ssh key of alpha"
    # Each put is a new secret, even for the same bytes.
    other = vault.put(plaintext)
    assert other != secret_id
    assert len(secret_rows(store)) == 2


def test_get_of_an_unknown_id_is_not_found(vault: Vault):
    with pytest.raises(NotFound, match="vault secret vlt_0+ does not exist"):
        vault.get("vlt_" + "0" * 32)


def test_put_sealed_is_idempotent(vault: Vault, store: Store):
    envelope = crypto.seal(crypto.load_public_key(vault.keys_dir), b"kubeconfig: yes")

    first = vault.put_sealed(envelope, description="kubeconfig")
    second = vault.put_sealed(envelope, description="kubeconfig, again")

    assert first == second == sealed_secret_id(envelope)
    assert secret_rows(store) == {first: (current_key_id(vault), envelope)}
    assert store.get_secret(first).description == "kubeconfig"
    assert vault.get(first) == b"kubeconfig: yes"


def test_put_sealed_refuses_an_envelope_for_another_key(vault: Vault, store: Store,
                                                        foreign_keys: Path):
    envelope = crypto.seal(crypto.load_public_key(foreign_keys), b"wrong vault")
    foreign_id = crypto.key_id(crypto.load_public_key(foreign_keys))

    with pytest.raises(VaultError, match=f"sealed for key {foreign_id}, this vault holds key "
                                         f"{current_key_id(vault)}"):
        vault.put_sealed(envelope)

    assert secret_rows(store) == {}


def test_rotate_rewraps_every_secret(vault: Vault, store: Store):
    old_id = current_key_id(vault)
    plaintexts = {vault.put(f"secret number {i}".encode()): f"secret number {i}".encode()
                  for i in range(3)}
    sealed = crypto.seal(crypto.load_public_key(vault.keys_dir), b"sealed by a client")
    plaintexts[vault.put_sealed(sealed)] = b"sealed by a client"
    before = secret_rows(store)
    assert {key_id for key_id, _ in before.values()} == {old_id}

    new_id, count = vault.rotate()

    assert new_id != old_id
    assert new_id == current_key_id(vault)
    assert count == len(plaintexts) == 4
    after = secret_rows(store)
    assert set(after) == set(before)
    for secret_id, (key_id, envelope) in after.items():
        assert key_id == new_id
        assert crypto.envelope_key_id(envelope) == new_id
        assert envelope != before[secret_id][1]
        assert vault.get(secret_id) == plaintexts[secret_id]
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(SecretRow)
                        .where(SecretRow.rotated_at.is_(None))) == 0

    # Nothing is left under the old key: a second pass re-wraps nothing and changes nothing.
    assert vault.rewrap_all() == (new_id, 0)
    assert secret_rows(store) == after


def test_a_secret_restored_under_a_retired_key(vault: Vault, store: Store):
    secret_id = vault.put(b"from the backup")
    old_id = current_key_id(vault)
    old_envelope = store.get_secret(secret_id).envelope
    vault.rotate()
    # A backup of the store from before the rotation comes back.
    with store.session() as s:
        s.execute(update(SecretRow).where(SecretRow.id == secret_id)
                  .values(key_id=old_id, envelope=old_envelope))

    # While the retired key is kept, the secret still opens ...
    assert vault.get(secret_id) == b"from the backup"
    # ... once it is removed, the vault fails closed and says which key is missing.
    for old in vault.keys_dir.glob(f"*.{old_id}.old"):
        old.unlink()
    with pytest.raises(VaultError, match=f"sealed for key {old_id}, which this vault no "
                                         "longer holds"):
        vault.get(secret_id)
    with pytest.raises(VaultError):
        vault.rewrap_all()
    assert store.get_secret(secret_id).envelope == old_envelope


def test_no_plaintext_reaches_the_database(vault: Vault, store: Store, airfleet_home: Path):
    canary = "canary-" + secrets.token_hex(24)
    put_id = vault.put(canary.encode(), description="canary via put")
    sealed_id = vault.put_sealed(
        crypto.seal(crypto.load_public_key(vault.keys_dir), f"{canary}-sealed".encode()),
        description="canary via put_sealed")
    assert vault.get(put_id) == canary.encode()
    assert vault.get(sealed_id) == f"{canary}-sealed".encode()

    db = airfleet_home / "airfleet.db"
    files = [db, db.with_name(db.name + "-wal")]
    data = b"".join(f.read_bytes() for f in files if f.exists())
    # The bytes scanned are the ones the store wrote: both ids are in them ...
    assert put_id.encode() in data and sealed_id.encode() in data
    # ... and the canary, in any spelling, is not.
    for needle in (canary[7:], canary[7:].upper(), canary.encode().hex()):
        assert needle.encode() not in data

    cells = []
    with store.engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            cells += [str(cell) for row in conn.execute(text(f'SELECT * FROM "{table}"'))
                      for cell in row]
    assert put_id in cells and sealed_id in cells
    assert not [cell for cell in cells if canary[7:] in cell]


@pytest.mark.parametrize("part", [2, 3, 4])  # the wrapped key, the nonce, the ciphertext
def test_a_tampered_envelope_fails_closed(vault: Vault, store: Store, part: int):
    secret_id = vault.put(b"do not trust a changed envelope")
    envelope = store.get_secret(secret_id).envelope
    pieces = envelope.split(".")
    middle = len(pieces[part]) // 2
    char = pieces[part][middle]
    pieces[part] = pieces[part][:middle] + ("B" if char == "A" else "A") + \
        pieces[part][middle + 1:]
    tampered = ".".join(pieces)
    assert tampered != envelope and len(tampered) == len(envelope)
    with store.session() as s:
        s.execute(update(SecretRow).where(SecretRow.id == secret_id).values(envelope=tampered))

    with pytest.raises(VaultError, match="tampered with or is corrupt"):
        vault.get(secret_id)
