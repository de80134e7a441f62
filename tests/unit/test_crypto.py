"""Vault key handling and envelope encryption (airfleet.crypto).

RSA-4096 generation takes about a second, so key pairs are made once per module.
"""

from __future__ import annotations

import base64
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from airfleet import crypto
from airfleet.errors import VaultError
from airfleet.resources import ENVELOPE_PATTERN

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
SECRET = b"hunter2-correct-horse"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("vault") / "keys"
    crypto.init_keys(directory)
    return directory


@pytest.fixture(scope="module")
def private_key(keydir: Path) -> rsa.RSAPrivateKey:
    return crypto.load_private_key(keydir)


@pytest.fixture(scope="module")
def public_key(keydir: Path) -> rsa.RSAPublicKey:
    return crypto.load_public_key(keydir)


@pytest.fixture(scope="module")
def envelope(public_key: rsa.RSAPublicKey) -> str:
    return crypto.seal(public_key, SECRET)


@dataclass
class Rotated:
    directory: Path
    old_id: str
    old: rsa.RSAPrivateKey
    new: rsa.RSAPrivateKey
    before: str  # sealed with the old public key before the rotation


@pytest.fixture(scope="module")
def rotated(keydir: Path, public_key: rsa.RSAPublicKey,
            tmp_path_factory: pytest.TempPathFactory) -> Rotated:
    directory = tmp_path_factory.mktemp("rotate") / "keys"
    shutil.copytree(keydir, directory)
    before = crypto.seal(public_key, SECRET)
    old, new = crypto.rotate_keys(directory)
    return Rotated(directory, crypto.key_id(public_key), old, new, before)


# --- key files --------------------------------------------------------------------------------


def test_init_returns_the_key_id_of_the_written_pair(keydir: Path, public_key, private_key):
    kid = crypto.key_id(public_key)
    assert re.fullmatch(r"[0-9a-f]{16}", kid)
    assert crypto.key_id(private_key.public_key()) == kid
    assert public_key.key_size == 4096
    assert sorted(p.name for p in keydir.iterdir()) == ["airfleet-vault.key", "airfleet-vault.pub"]


def test_key_id_is_sha256_of_der_subject_public_key_info(public_key):
    import hashlib

    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    assert crypto.key_id(public_key) == hashlib.sha256(der).hexdigest()[:16]


def test_key_file_modes_and_formats(keydir: Path):
    assert mode(keydir) == 0o700
    assert mode(keydir / crypto.KEY_FILE) == 0o600
    assert mode(keydir / crypto.PUBLIC_KEY_FILE) == 0o644
    assert (keydir / crypto.KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (keydir / crypto.PUBLIC_KEY_FILE).read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_init_refuses_to_overwrite(keydir: Path):
    before = {p.name: p.read_bytes() for p in keydir.iterdir()}
    with pytest.raises(VaultError) as err:
        crypto.init_keys(keydir)
    assert f"already exist at {keydir / crypto.KEY_FILE}" in str(err.value)
    assert "airfleet keys rotate" in str(err.value)
    assert {p.name: p.read_bytes() for p in keydir.iterdir()} == before


def test_init_refuses_when_only_the_public_key_exists(keydir: Path, tmp_path: Path):
    shutil.copy(keydir / crypto.PUBLIC_KEY_FILE, tmp_path / crypto.PUBLIC_KEY_FILE)
    with pytest.raises(VaultError, match="already exist at .*airfleet-vault.pub"):
        crypto.init_keys(tmp_path)
    assert not (tmp_path / crypto.KEY_FILE).exists()


@pytest.mark.parametrize("loader, filename", [
    (crypto.load_private_key, crypto.KEY_FILE),
    (crypto.load_public_key, crypto.PUBLIC_KEY_FILE),
])
def test_missing_key_file_says_what_to_do(loader, filename, tmp_path: Path):
    with pytest.raises(VaultError) as err:
        loader(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / filename) in message
    assert "airfleet keys init" in message
    assert "AIRFLEET_KEYS_DIR" in message


def test_directory_defaults_to_airfleet_keys_dir(keydir: Path, public_key, monkeypatch):
    monkeypatch.setenv("AIRFLEET_KEYS_DIR", str(keydir))
    assert crypto.key_id(crypto.load_public_key()) == crypto.key_id(public_key)


def test_garbage_key_file_is_a_vault_error(tmp_path: Path):
    (tmp_path / crypto.KEY_FILE).write_text("not a key")
    with pytest.raises(VaultError, match="cannot read the vault private key"):
        crypto.load_private_key(tmp_path)


# --- envelopes --------------------------------------------------------------------------------


def test_round_trip(private_key, envelope: str):
    assert crypto.unseal(private_key, envelope) == SECRET


@pytest.mark.parametrize("plaintext", [b"", b"\x00" * 5, bytes(range(256)) * 40])
def test_round_trip_sizes(public_key, private_key, plaintext: bytes):
    assert crypto.unseal(private_key, crypto.seal(public_key, plaintext)) == plaintext


def test_envelope_format(public_key, envelope: str):
    assert re.match(ENVELOPE_PATTERN, envelope)
    version, kid, wrapped, nonce, ciphertext = envelope.split(".")
    assert version == "afv1"
    assert kid == crypto.key_id(public_key) == crypto.envelope_key_id(envelope)
    assert len(unb64(wrapped)) == 512
    assert len(unb64(nonce)) == 12
    assert len(unb64(ciphertext)) == len(SECRET) + 16
    assert "=" not in envelope
    assert envelope.isascii()


def test_every_seal_differs(public_key):
    envelopes = [crypto.seal(public_key, SECRET) for _ in range(5)]
    assert len(set(envelopes)) == 5
    parts = [e.split(".") for e in envelopes]
    assert len({p[2] for p in parts}) == 5  # fresh wrapped AES key
    assert len({p[3] for p in parts}) == 5  # fresh nonce


def test_seal_needs_only_the_public_key_file(keydir: Path, private_key, tmp_path: Path):
    shutil.copy(keydir / crypto.PUBLIC_KEY_FILE, tmp_path / crypto.PUBLIC_KEY_FILE)
    sealed = crypto.seal(crypto.load_public_key(tmp_path), SECRET)
    with pytest.raises(VaultError, match="no vault private key"):
        crypto.load_private_key(tmp_path)
    assert crypto.unseal(private_key, sealed) == SECRET


def test_seal_rejects_text(public_key):
    with pytest.raises(VaultError, match="bytes"):
        crypto.seal(public_key, "text")  # type: ignore[arg-type]


def _variants(char: str, alphabet: str) -> str:
    """A different character of the same alphabet (keeps the envelope well-formed)."""
    return alphabet[(alphabet.index(char) + 1) % len(alphabet)] if char in alphabet else "A"


def test_changing_any_character_fails_closed(private_key, envelope: str):
    accepted = []
    for i, char in enumerate(envelope):
        alphabet = "0123456789abcdef" if 5 <= i < 21 else B64URL
        tampered = envelope[:i] + _variants(char, alphabet) + envelope[i + 1:]
        assert tampered != envelope
        try:
            crypto.unseal(private_key, tampered)
        except VaultError as exc:
            assert SECRET.decode() not in str(exc)
        else:
            accepted.append(i)
    assert accepted == []


@pytest.mark.parametrize("part", [2, 3, 4])
def test_flipping_any_decoded_byte_fails_closed(private_key, envelope: str, part: int):
    fields = envelope.split(".")
    raw = unb64(fields[part])
    positions = range(len(raw)) if part != 2 else [0, 1, 100, 255, 256, 400, 510, 511]
    for pos in positions:
        for bit in (0x01, 0x80):
            flipped = bytearray(raw)
            flipped[pos] ^= bit
            tampered = ".".join(fields[:part] + [b64(bytes(flipped))] + fields[part + 1:])
            with pytest.raises(VaultError, match="tampered with or is corrupt"):
                crypto.unseal(private_key, tampered)


def test_swapped_parts_fail_closed(public_key, private_key, envelope: str):
    other = crypto.seal(public_key, b"another secret").split(".")
    fields = envelope.split(".")
    for part in (2, 3, 4):
        mixed = ".".join(fields[:part] + [other[part]] + fields[part + 1:])
        with pytest.raises(VaultError, match="tampered with or is corrupt"):
            crypto.unseal(private_key, mixed)


def test_swapped_key_id_fails_closed(private_key, envelope: str):
    fields = envelope.split(".")
    fields[1] = "0123456789abcdef"
    with pytest.raises(VaultError, match="sealed for key 0123456789abcdef"):
        crypto.unseal(private_key, ".".join(fields))


def test_key_id_is_bound_as_associated_data(rotated: Rotated, private_key, envelope: str):
    """A header rewritten to the holder's key id, with a wrapped key valid for it, still fails."""
    fields = envelope.split(".")
    data_key = private_key.decrypt(unb64(fields[2]), crypto._OAEP)
    rewrapped = rotated.new.public_key().encrypt(data_key, crypto._OAEP)
    forged = ".".join(["afv1", crypto.key_id(rotated.new.public_key()), b64(rewrapped),
                       fields[3], fields[4]])
    with pytest.raises(VaultError, match="authentication failed"):
        crypto.unseal(rotated.new, forged)


@pytest.mark.parametrize("bad", [
    "", "afv1", "afv1.", "hello world", "afv1.0123456789abcdef.AA.AA",
    "afv1.0123456789ABCDEF.AA.AA.AA", "afv1.0123456789abcdef.AA.AA.AA\n",
    "afv1.0123456789abcdef.A=.AA.AA", " afv1.0123456789abcdef.AA.AA.AA", None, b"afv1",
])
def test_malformed_envelope(private_key, bad):
    with pytest.raises(VaultError, match="not an afv1 envelope"):
        crypto.unseal(private_key, bad)
    with pytest.raises(VaultError, match="not an afv1 envelope"):
        crypto.envelope_key_id(bad)


def test_other_version_is_named(private_key, envelope: str):
    with pytest.raises(VaultError, match="unsupported envelope version afv2"):
        crypto.unseal(private_key, "afv2" + envelope[4:])


def test_wrong_key_names_both_key_ids(rotated: Rotated, private_key, envelope: str):
    sealed_for = crypto.key_id(private_key.public_key())
    holds = crypto.key_id(rotated.new.public_key())
    with pytest.raises(VaultError) as err:
        crypto.unseal(rotated.new, envelope)
    assert f"sealed for key {sealed_for}, this vault holds key {holds}" in str(err.value)
    assert SECRET.decode() not in str(err.value)


# --- rotation ---------------------------------------------------------------------------------


def test_rotate_installs_a_new_pair(rotated: Rotated, private_key):
    directory = rotated.directory
    new_id = crypto.key_id(rotated.new.public_key())
    assert new_id != rotated.old_id
    assert crypto.key_id(rotated.old.public_key()) == rotated.old_id
    assert rotated.old.private_numbers() == private_key.private_numbers()
    assert crypto.key_id(crypto.load_private_key(directory).public_key()) == new_id
    assert crypto.key_id(crypto.load_public_key(directory)) == new_id
    assert mode(directory / crypto.KEY_FILE) == 0o600
    assert mode(directory / crypto.PUBLIC_KEY_FILE) == 0o644
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_rotate_keeps_the_old_pair_as_old_files(rotated: Rotated, keydir: Path):
    old_key = rotated.directory / f"airfleet-vault.key.{rotated.old_id}.old"
    old_pub = rotated.directory / f"airfleet-vault.pub.{rotated.old_id}.old"
    assert mode(old_key) == 0o600
    assert mode(old_pub) == 0o600
    assert old_key.read_bytes() == (keydir / crypto.KEY_FILE).read_bytes()
    assert old_pub.read_bytes() == (keydir / crypto.PUBLIC_KEY_FILE).read_bytes()
    reloaded = crypto.load_old_private_key(rotated.directory, rotated.old_id)
    assert reloaded.private_numbers() == rotated.old.private_numbers()


def test_rewrap_moves_an_envelope_to_the_new_key(rotated: Rotated):
    with pytest.raises(VaultError, match="sealed for key"):
        crypto.unseal(rotated.new, rotated.before)
    after = crypto.rewrap(rotated.old, rotated.new.public_key(), rotated.before)
    assert re.match(ENVELOPE_PATTERN, after)
    assert crypto.envelope_key_id(after) == crypto.key_id(rotated.new.public_key())
    assert crypto.unseal(rotated.new, after) == SECRET
    with pytest.raises(VaultError, match="sealed for key"):
        crypto.unseal(rotated.old, after)
    # Resuming an interrupted re-wrap leaves finished envelopes alone.
    assert crypto.rewrap(rotated.old, rotated.new.public_key(), after) == after


def test_rewrap_rejects_tampering(rotated: Rotated):
    fields = rotated.before.split(".")
    fields[4] = b64(bytes([unb64(fields[4])[0] ^ 1]) + unb64(fields[4])[1:])
    with pytest.raises(VaultError, match="tampered"):
        crypto.rewrap(rotated.old, rotated.new.public_key(), ".".join(fields))


def test_rotate_without_keys_says_what_to_do(tmp_path: Path):
    with pytest.raises(VaultError, match="airfleet keys init"):
        crypto.rotate_keys(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_old_private_key_missing(rotated: Rotated):
    with pytest.raises(VaultError, match="no vault private key at .*ffffffffffffffff.old"):
        crypto.load_old_private_key(rotated.directory, "ffffffffffffffff")
    with pytest.raises(VaultError, match="16 lowercase hex"):
        crypto.load_old_private_key(rotated.directory, "../../etc/passwd")
