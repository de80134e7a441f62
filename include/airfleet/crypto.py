"""The vault's key handling and envelope encryption: pure functions over bytes and paths.

Every secret is sealed with a fresh random AES-256-GCM key and a fresh 12-byte nonce; the AES
key is wrapped with the vault's RSA-4096 public key (OAEP, SHA-256, MGF1-SHA-256). The result is
one ASCII string (see :data:`airfleet.resources.ENVELOPE_PATTERN`)::

    afv1.<key id>.<wrapped AES key>.<nonce>.<ciphertext and GCM tag>

The key id is the first 16 hex digits of the SHA-256 of the public key's DER
SubjectPublicKeyInfo; the last three parts are unpadded base64url. The header ``afv1.<key id>``
is bound to the ciphertext as AES-GCM associated data, so changing it fails authentication.
Sealing needs only the public key; unsealing fails closed with :class:`VaultError` and never
puts plaintext or key material in a message.

Key files live in one directory (default :func:`airfleet.config.keys_dir`, 0700):

- ``airfleet-vault.key``: the private key, PKCS#8 PEM, unencrypted, mode 0600;
- ``airfleet-vault.pub``: the public key, SubjectPublicKeyInfo PEM, mode 0644;
- ``airfleet-vault.key.<key id>.old`` / ``airfleet-vault.pub.<key id>.old``: pairs retired by
  :func:`rotate_keys`, mode 0600, kept until every envelope has been re-wrapped.

The store-backed ``Vault`` builds on these functions; nothing here touches a database.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import logging
import os
import re
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from airfleet.config import keys_dir
from airfleet.errors import VaultError
from airfleet.resources import ENVELOPE_PATTERN

log = logging.getLogger(__name__)

KEY_FILE = "airfleet-vault.key"
PUBLIC_KEY_FILE = "airfleet-vault.pub"

VERSION = "afv1"
RSA_KEY_SIZE = 4096
NONCE_SIZE = 12
AES_KEY_SIZE = 32
_TAG_SIZE = 16
_KEY_ID_HEX = 16

_ENVELOPE = re.compile(ENVELOPE_PATTERN)
_OTHER_VERSION = re.compile(r"afv[0-9]+")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_TAMPERED = "envelope was tampered with or is corrupt"
_INIT_HINT = "run `airfleet keys init` (or set AIRFLEET_KEYS_DIR / pass --dir to use another folder)"


# --- keys -------------------------------------------------------------------------------------


def key_id(public_key: rsa.RSAPublicKey) -> str:
    """The key's id: the first 16 hex digits of SHA-256 over its DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:_KEY_ID_HEX]


def init_keys(directory: Path | None = None) -> str:
    """Create the vault's key pair in ``directory`` and return its key id.

    The directory is created if needed and made 0700. The private key is written first (mode
    0600 from the moment the file exists: a temp file opened with ``O_EXCL`` and mode 0o600, then
    hard-linked into place, which also refuses to replace an existing file), then the public
    key (0644), so a public key is never published without its private key on disk.

    :param directory: the keys folder; default :func:`airfleet.config.keys_dir`.
    :raises VaultError: if a key file already exists there (nothing is overwritten), or the
        files cannot be written.
    """
    directory = Path(directory) if directory is not None else keys_dir()
    _refuse_existing(directory)
    _make_private_dir(directory)
    private_key = _generate()
    _write_new(directory / KEY_FILE, _private_pem(private_key), 0o600)
    _write_new(directory / PUBLIC_KEY_FILE, _public_pem(private_key.public_key()), 0o644)
    _fsync_dir(directory)
    kid = key_id(private_key.public_key())
    log.info("Created vault key pair %s in %s", kid, directory)
    return kid


def load_public_key(directory: Path | None = None) -> rsa.RSAPublicKey:
    """Read ``airfleet-vault.pub`` from ``directory`` (default :func:`~airfleet.config.keys_dir`).

    :raises VaultError: the file is missing, unreadable or not an RSA-4096 public key.
    """
    return load_public_key_file((Path(directory) if directory is not None else keys_dir())
                                / PUBLIC_KEY_FILE)


def load_public_key_file(path: Path) -> rsa.RSAPublicKey:
    """Read a public key PEM from ``path`` (sealing on a machine that has only this file)."""
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise VaultError(f"cannot read the vault public key at {path}: not a PEM "
                         "SubjectPublicKeyInfo public key") from None
    return _require_rsa(key, path)


def load_private_key(directory: Path | None = None) -> rsa.RSAPrivateKey:
    """Read ``airfleet-vault.key`` from ``directory`` (default :func:`~airfleet.config.keys_dir`).

    :raises VaultError: the file is missing, unreadable or not an unencrypted RSA-4096 key.
    """
    directory = Path(directory) if directory is not None else keys_dir()
    return _load_private(directory / KEY_FILE)


def load_old_private_key(directory: Path | None, old_key_id: str) -> rsa.RSAPrivateKey:
    """Read a private key retired by :func:`rotate_keys`: ``airfleet-vault.key.<id>.old``.

    Used to finish an interrupted rotation: an envelope whose :func:`envelope_key_id` is not
    the current key's is re-wrapped with the retired key of that id.

    :raises VaultError: no retired key of that id exists, or it is unreadable.
    """
    if not isinstance(old_key_id, str) or not _KEY_ID.fullmatch(old_key_id):
        raise VaultError("a key id is 16 lowercase hex digits")
    directory = Path(directory) if directory is not None else keys_dir()
    key = _load_private(directory / _old_name(KEY_FILE, old_key_id))
    if key_id(key.public_key()) != old_key_id:
        raise VaultError(f"the retired key file {directory / _old_name(KEY_FILE, old_key_id)} "
                         f"does not hold key {old_key_id}")
    return key


def rotate_keys(directory: Path | None = None) -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    """Replace the vault's key pair with a new one; return ``(old_private_key, new_private_key)``.

    Order, chosen so that a crash at any point loses no key:

    1. Load the current private key (it, not the ``.pub`` file, defines the old key id).
    2. Save the old pair as ``airfleet-vault.key.<old id>.old`` and
       ``airfleet-vault.pub.<old id>.old`` (0600, temp file + fsync + ``os.replace``;
       idempotent, so a re-run after a crash rewrites the same content).
    3. Generate the new pair, write both to 0600 temp files, fsync, then ``os.replace`` the
       private key first and the public key second (never a public key in place whose private
       key is not), and fsync the directory.

    From here the new key is the one the files hold, and new secrets are sealed for it. The
    caller then re-wraps every stored envelope with ``rewrap(old, new.public_key(), envelope)``,
    in one transaction if it can. The rotation is complete only when no stored envelope carries
    the old key id; until then the old key stays readable from its ``.old`` file, so:

    - crash before step 3: nothing changed except the ``.old`` copies; run the rotation again;
    - crash between the two replaces (private new, public old): envelopes sealed meanwhile carry
      the old id and are readable with the ``.old`` key; run the rotation again (it retires this
      key too and installs a consistent pair);
    - crash during re-wrapping: re-wrap each envelope whose :func:`envelope_key_id` differs from
      the current key's with :func:`load_old_private_key` of that id (``rewrap`` leaves envelopes
      already sealed for the new key unchanged).

    The ``.old`` files are never deleted here; an operator removes them once re-wrapping is done.

    :param directory: the keys folder; default :func:`airfleet.config.keys_dir`.
    :raises VaultError: no current key pair, or a file cannot be written.
    """
    directory = Path(directory) if directory is not None else keys_dir()
    old = load_private_key(directory)
    old_id = key_id(old.public_key())
    _write_replace(directory / _old_name(KEY_FILE, old_id), _private_pem(old), 0o600)
    _write_replace(directory / _old_name(PUBLIC_KEY_FILE, old_id),
                   _public_pem(old.public_key()), 0o600)
    _fsync_dir(directory)

    new = _generate()
    _write_replace(directory / KEY_FILE, _private_pem(new), 0o600)
    _write_replace(directory / PUBLIC_KEY_FILE, _public_pem(new.public_key()), 0o644)
    _fsync_dir(directory)
    log.info("Rotated vault keys in %s: %s -> %s; re-wrap every secret, then remove the .old "
             "files", directory, old_id, key_id(new.public_key()))
    return old, new


# --- envelopes --------------------------------------------------------------------------------


def seal(public_key: rsa.RSAPublicKey, plaintext: bytes) -> str:
    """Encrypt ``plaintext`` for ``public_key``; return an ``afv1`` envelope.

    A fresh AES-256-GCM key and a fresh 12-byte nonce are drawn for every call, so sealing the
    same plaintext twice gives two different envelopes.
    """
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise VaultError("sealing needs the vault's RSA public key")
    _require_size(public_key.key_size)
    if not isinstance(plaintext, bytes | bytearray | memoryview):
        raise VaultError(f"seal takes bytes, got {type(plaintext).__name__}")
    header = f"{VERSION}.{key_id(public_key)}"
    data_key = AESGCM.generate_key(bit_length=AES_KEY_SIZE * 8)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(data_key).encrypt(nonce, bytes(plaintext), header.encode("ascii"))
    wrapped = public_key.encrypt(data_key, _OAEP)
    return ".".join((header, _b64(wrapped), _b64(nonce), _b64(ciphertext)))


def unseal(private_key: rsa.RSAPrivateKey, envelope: str) -> bytes:
    """Decrypt an envelope made by :func:`seal` for this private key's public key.

    :raises VaultError: the envelope is malformed, was sealed for another key, or fails
        authentication (tampered or corrupt). The vault fails closed: nothing is returned.
    """
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise VaultError("unsealing needs the vault's RSA private key")
    _require_size(private_key.key_size)
    sealed_for, wrapped, nonce, ciphertext = _parse(envelope)
    holds = key_id(private_key.public_key())
    if sealed_for != holds:
        raise VaultError(f"envelope was sealed for key {sealed_for}, this vault holds key {holds}; "
                         "it was sealed with another public key, or a key rotation has not "
                         "re-wrapped it yet")
    if (len(wrapped) != private_key.key_size // 8 or len(nonce) != NONCE_SIZE
            or len(ciphertext) < _TAG_SIZE):
        raise VaultError(f"{_TAMPERED} (a part has the wrong length)")
    try:
        data_key = private_key.decrypt(wrapped, _OAEP)
    except ValueError:
        raise VaultError(f"{_TAMPERED} (the wrapped key does not decrypt)") from None
    if len(data_key) != AES_KEY_SIZE:
        raise VaultError(f"{_TAMPERED} (the wrapped key has the wrong length)")
    aad = f"{VERSION}.{sealed_for}".encode("ascii")
    try:
        return AESGCM(data_key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise VaultError(f"{_TAMPERED} (authentication failed)") from None


def envelope_key_id(envelope: str) -> str:
    """The id of the key an envelope was sealed for.

    :raises VaultError: the envelope is malformed.
    """
    return _parse(envelope)[0]


def rewrap(old_private_key: rsa.RSAPrivateKey, new_public_key: rsa.RSAPublicKey,
           envelope: str) -> str:
    """Re-seal an envelope from the old key for the new key.

    Implemented as :func:`unseal` with the old key followed by :func:`seal` for the new one, so
    the result has a fresh AES key and nonce and binds the new key id (re-wrapping only the AES
    key would not do: the key id is part of the GCM associated data). The plaintext exists only
    in memory, as for ``unseal``. An envelope already sealed for the new key is returned
    unchanged, so re-running an interrupted re-wrap is safe.

    :raises VaultError: as :func:`unseal` with the old key.
    """
    if envelope_key_id(envelope) == key_id(new_public_key):
        return envelope
    return seal(new_public_key, unseal(old_private_key, envelope))


# --- helpers ----------------------------------------------------------------------------------


def _parse(envelope: str) -> tuple[str, bytes, bytes, bytes]:
    if not isinstance(envelope, str) or not _ENVELOPE.fullmatch(envelope):
        version = envelope.split(".", 1)[0] if isinstance(envelope, str) else ""
        if _OTHER_VERSION.fullmatch(version) and version != VERSION:
            raise VaultError(f"unsupported envelope version {version}; this vault reads {VERSION}")
        raise VaultError("not an afv1 envelope (expected afv1.<key id>.<key>.<nonce>.<data>, "
                         "base64url without padding)")
    _, kid, wrapped, nonce, ciphertext = envelope.split(".")
    return kid, _unb64(wrapped), _unb64(nonce), _unb64(ciphertext)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """Decode unpadded base64url, accepting only the canonical encoding.

    The spare low bits of the last character must be zero, so an envelope has exactly one
    spelling and no character of it can change without the decoded bytes changing.
    """
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(f"{_TAMPERED} (invalid base64url)") from None
    if _b64(data) != text:
        raise VaultError(f"{_TAMPERED} (non-canonical base64url)")
    return data


def _generate() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_SIZE)


def _private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _public_pem(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _require_size(size: int) -> None:
    if size != RSA_KEY_SIZE:
        raise VaultError(f"the vault uses RSA-{RSA_KEY_SIZE} keys, got RSA-{size}")


def _require_rsa(key: object, path: Path) -> rsa.RSAPublicKey | rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        raise VaultError(f"the vault key at {path} is not an RSA key")
    if key.key_size != RSA_KEY_SIZE:
        raise VaultError(f"the vault key at {path} is RSA-{key.key_size}; the vault uses "
                         f"RSA-{RSA_KEY_SIZE}")
    return key


def _load_private(path: Path) -> rsa.RSAPrivateKey:
    data = _read_key_file(path, "private key")
    try:
        key = _parse_private(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise VaultError(f"cannot read the vault private key at {path}: not an unencrypted "
                         "PKCS#8 PEM private key") from None
    return _require_rsa(key, path)


@functools.lru_cache(maxsize=8)
def _parse_private(pem: bytes):
    # Loading checks the RSA-4096 key's consistency, about 0.5 s; every task that opens a
    # secret loads it. Keyed by the file's bytes, a rotated key is parsed (and checked) anew.
    return serialization.load_pem_private_key(pem, password=None)


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise VaultError(f"no vault {what} at {path}; {_INIT_HINT}") from None
    except OSError as exc:
        raise VaultError(f"cannot read the vault {what} at {path}: {exc.strerror}") from None


def _old_name(name: str, old_key_id: str) -> str:
    return f"{name}.{old_key_id}.old"


def _refuse_existing(directory: Path) -> None:
    for name in (KEY_FILE, PUBLIC_KEY_FILE):
        path = directory / name
        if path.exists() or path.is_symlink():
            raise VaultError(f"vault keys already exist at {path}; refusing to overwrite them. "
                             "`airfleet keys rotate` replaces them (and keeps the old pair)")


def _make_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask; an old dir may be open
    except OSError as exc:
        raise VaultError(f"cannot create the keys folder {directory}: {exc.strerror}") from None


def _write_temp(final: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a fresh 0600 temp file beside ``final``, fsync it, set ``mode``."""
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise VaultError(f"cannot write {final}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # exact mode, whatever the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise VaultError(f"cannot write {final}: {exc.strerror}") from None
    return tmp


def _write_new(final: Path, data: bytes, mode: int) -> None:
    """Atomically create ``final``; refuse if it exists (hard link of a complete temp file)."""
    tmp = _write_temp(final, data, mode)
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise VaultError(f"vault keys already exist at {final}; refusing to overwrite them. "
                         "`airfleet keys rotate` replaces them (and keeps the old pair)") from None
    except OSError as exc:
        raise VaultError(f"cannot write {final}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_replace(final: Path, data: bytes, mode: int) -> None:
    """Atomically create or replace ``final`` (temp file, fsync, ``os.replace``)."""
    tmp = _write_temp(final, data, mode)
    try:
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise VaultError(f"cannot write {final}: {exc.strerror}") from None


def _fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
