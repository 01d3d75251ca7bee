"""DKIM private keys: loading (validated once), caching per worker, generating, and DNS record text.

Keys are checked when they are loaded, so a bad key stops a (re)load instead of a message:
wrong type for the algorithm, RSA under 1024 bits (RFC 8301 §3.2), encrypted, unreadable, or
readable by other users. What dkimpy's ``sign()`` needs is prepared here once (``dkim_private``).

No DNS here: ``authmilter keys test`` asks the resolver and passes the TXT strings it got to
:func:`check_published_key`, a pure function.
"""

from __future__ import annotations

import base64
import binascii
import os
import pwd
import re
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from authmilter.domains import to_a_labels

# The signing algorithms (RFC 8301 §3.1 forbids signing with rsa-sha1) and their key record k= tags.
KEY_TYPES = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}
ALGORITHMS = tuple(KEY_TYPES)
# What load_private_key does with a key file other users may read or write.
PERMISSION_POLICIES = ("refuse", "warn", "ignore")

# RFC 8301 §3.2: signers MUST use at least 1024 bits and SHOULD use at least 2048; verifiers need
# only validate keys up to 4096 bits, so genkey makes none larger.
MIN_RSA_BITS = 1024
RECOMMENDED_RSA_BITS = 2048
MAX_RSA_BITS = 4096
ED25519_BITS = 256
# A PEM RSA-4096 key is about 3.3 KB; anything much bigger is not a key file (e.g. /dev/zero).
MAX_KEY_FILE_BYTES = 64 * 1024
# RFC 1035 §3.3.14: a character-string is one length octet and at most 255 octets.
MAX_CHARACTER_STRING = 255
# RFC 1035 §2.3.4: labels of at most 63 octets; a name of at most 253 characters in text form.
MAX_LABEL = 63
MAX_NAME = 253

# Group or others may read (and copy) or write (and replace) the key.
_UNSAFE_MODE_BITS = stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH
# OpenDKIM's KeyTable takes key data in place of a path (anything not starting with "/").
_INLINE_KEY = re.compile(r"-----BEGIN.*|[A-Za-z0-9+/=\s]{40,}", re.DOTALL)
# RFC 5321 §4.1.2 sub-domain (RFC 6376 §3.1 selector, §3.5 d=): letters, digits, inner hyphens.
_SUB_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# RFC 6376 §3.2: tag-name = ALPHA *ALNUMPUNC.
_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_WHITESPACE = re.compile(r"\s+")


class KeyFileError(ValueError):
    """A key file is unusable; the message is "PATH: problem and what to do"."""


@dataclass(frozen=True)
class PrivateKey:
    """A DKIM signing key, loaded and checked.

    Attributes:
        path: the file it came from ("" for a key just generated).
        algorithm: ``rsa-sha256`` or ``ed25519-sha256``.
        bits: the RSA modulus size; 256 for Ed25519.
        dkim_private: what dkimpy's ``sign()`` takes: PKCS#1 PEM for RSA, the base64 of the 32-byte
            seed for Ed25519 (``nacl.signing.SigningKey(..., encoder=Base64Encoder)``). Kept out of repr.
        public_b64: the key record's ``p=``: base64 of the DER SubjectPublicKeyInfo for RSA
            (RFC 6376 §3.6.1), of the raw 32-byte public key for Ed25519 (RFC 8463 §4.2).
        warnings: what the operator should fix although the key was accepted (a key file others may
            read, under ``permissions="warn"``).
    """

    path: str
    algorithm: str
    bits: int
    dkim_private: bytes = field(repr=False)
    public_b64: str
    warnings: tuple[str, ...] = ()

    @property
    def key_type(self) -> str:
        """The key record's ``k=`` value: ``rsa`` or ``ed25519``."""
        return KEY_TYPES[self.algorithm]

    @property
    def description(self) -> str:
        """``RSA 2048 bits`` or ``Ed25519``, for messages."""
        return f"RSA {self.bits} bits" if self.key_type == "rsa" else "Ed25519"


def load_private_key(path: str, algorithm: str | None = None, *, permissions: str = "refuse") -> PrivateKey:
    """Read and check one private key file.

    Accepted forms: PEM (PKCS#1 ``RSA PRIVATE KEY`` or PKCS#8 ``PRIVATE KEY``), DER (as OpenDKIM
    reads it), and dkimpy-milter's Ed25519 file (the base64 of the 32-byte seed, from ``dknewkey``).

    Args:
        path: the key file.
        algorithm: ``rsa-sha256`` or ``ed25519-sha256`` to insist on; None takes it from the key.
        permissions: a key file that group or others may read or write is refused (``refuse``),
            accepted with a warning in ``PrivateKey.warnings`` (``warn``), or accepted (``ignore``).

    Returns:
        the key, ready for dkimpy.

    Raises:
        KeyFileError: unreadable, encrypted, inline key data, not RSA or Ed25519, another type than
            ``algorithm``, RSA under 1024 bits, or unsafe permissions under ``refuse``.
        ValueError: ``permissions`` is not one of :data:`PERMISSION_POLICIES`.
    """
    if permissions not in PERMISSION_POLICIES:
        raise ValueError(f"permissions must be one of {', '.join(PERMISSION_POLICIES)}, not {permissions!r}")
    if algorithm is not None and algorithm not in KEY_TYPES:
        raise KeyFileError(f"{path}: unknown algorithm {algorithm!r}; use rsa-sha256 or ed25519-sha256")
    data, mode = _read_key_file(path)
    warnings = _permission_warnings(path, mode, permissions)
    return _checked_key(path, _parse_private_key(path, data), algorithm, warnings)


def _read_key_file(path: str) -> tuple[bytes, int]:
    if not path.startswith("/") and not os.path.exists(path) and _INLINE_KEY.fullmatch(path):
        # Never echo the text: it is a private key.
        raise KeyFileError(
            f"{path[:12]}...: key data given inline instead of a file name; authmilter reads keys "
            "from files only: write the key to a file only the milter can read (mode 0600) and give its path"
        )
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; files ignore it.
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK)) as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise KeyFileError(f"{path}: not a regular file; give the path of the private key file")
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except PermissionError as e:
        user = effective_user()
        raise KeyFileError(
            f"{path}: cannot read the key file: {e.strerror}: the milter runs as {user} and must be "
            f"able to read it: chown {user} {path} (authmilter genkey --owner {user} writes keys so)"
        ) from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the key file: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: over {MAX_KEY_FILE_BYTES} bytes, not a private key file")
    return data, info.st_mode


def effective_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _permission_warnings(path: str, mode: int, permissions: str) -> tuple[str, ...]:
    if permissions == "ignore" or not mode & _UNSAFE_MODE_BITS:
        return ()
    problem = (
        f"{path}: group or others may read or write the key (mode {stat.S_IMODE(mode):04o}); "
        f"let only the milter's user read it: chmod 600 {path}"
    )
    if permissions == "refuse":
        raise KeyFileError(problem)
    return (problem,)


def _parse_private_key(path: str, data: bytes) -> PrivateKeyTypes:
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise KeyFileError(f"{path}: this is a public key; give the private key file")
    seed = _dkimpy_ed25519_seed(data)
    if seed is not None:
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    is_pem = b"-----BEGIN" in data
    try:
        if is_pem:
            return serialization.load_pem_private_key(data, password=None)
        return serialization.load_der_private_key(data, password=None)
    except TypeError:
        # cryptography's way of saying "encrypted, and no password given".
        raise KeyFileError(
            f"{path}: the key is encrypted with a passphrase, which the milter cannot ask for; "
            f"store it decrypted, readable only by the milter (openssl pkey -in {path} -out NEWFILE)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        form = "PEM" if is_pem else "DER (no PEM header found)"
        raise KeyFileError(f"{path}: not a usable {form} private key: {e}") from None


def _dkimpy_ed25519_seed(data: bytes) -> bytes | None:
    """The seed of a dkimpy-milter Ed25519 key file (one base64 line, 32 bytes), else None."""
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return seed if len(seed) == 32 else None


def _checked_key(
    path: str, private: PrivateKeyTypes, algorithm: str | None, warnings: tuple[str, ...]
) -> PrivateKey:
    if isinstance(private, rsa.RSAPrivateKey):
        key = _rsa_key(path, private, warnings)
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        key = _ed25519_key(path, private, warnings)
    else:
        raise KeyFileError(
            f"{path}: a {type(private).__name__.removeprefix('_')} key; DKIM signs with RSA or Ed25519 "
            "only (RFC 8301, RFC 8463): generate one with authmilter genkey"
        )
    if algorithm is not None and algorithm != key.algorithm:
        raise KeyFileError(
            f"{path}: the algorithm is {algorithm} but this is an {key.description} key; "
            f"correct the KeyTable's algorithm field ({key.algorithm}) or point it to the right key"
        )
    return key


def _rsa_key(path: str, private: rsa.RSAPrivateKey, warnings: tuple[str, ...]) -> PrivateKey:
    if private.key_size < MIN_RSA_BITS:
        raise KeyFileError(
            f"{path}: RSA key of {private.key_size} bits; RFC 8301 §3.2 requires at least {MIN_RSA_BITS} "
            f"(verifiers treat smaller keys as failing): generate a {RECOMMENDED_RSA_BITS}-bit key"
        )
    # dkimpy parses PKCS#1 PEM directly; its PKCS#8 support is a fallback, so hand it PKCS#1.
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PrivateKey(path, "rsa-sha256", private.key_size, pem, base64.b64encode(spki).decode(), warnings)


def _ed25519_key(path: str, private: ed25519.Ed25519PrivateKey, warnings: tuple[str, ...]) -> PrivateKey:
    seed = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    raw_public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PrivateKey(
        path,
        "ed25519-sha256",
        ED25519_BITS,
        base64.b64encode(seed),
        base64.b64encode(raw_public).decode(),
        warnings,
    )


# os.stat fields that change when a key file is edited, replaced (rename) or chmod-ed.
_FileStamp = tuple[int, int, int, int, int]


def _file_stamp(path: str) -> _FileStamp | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class KeyCache:
    """Keys loaded once, reused; errors are not cached. Thread-safe.

    Args:
        follow_changes: re-read a key whose file changed (inode, size, mtime or ctime), for
            one-shot tools. The daemon passes False: a worker signs with the keys it loaded at
            start, so keys change only on SIGHUP (fresh workers), all at once, and a key file
            rewritten in place is never read half-written.
    """

    def __init__(self, follow_changes: bool = True) -> None:
        self._keys: dict[tuple[str, str | None, str], tuple[_FileStamp | None, PrivateKey]] = {}
        self._lock = threading.Lock()
        self._follow_changes = follow_changes

    def get(self, path: str, algorithm: str | None, permissions: str) -> PrivateKey:
        """The key at ``path``, from the cache when the file has not changed.

        Args:
            path, algorithm, permissions: as for :func:`load_private_key`.

        Returns:
            the key.

        Raises:
            KeyFileError: as :func:`load_private_key`.
        """
        entry = (path, algorithm, permissions)
        with self._lock:
            cached = self._keys.get(entry)
        if cached is not None and not self._follow_changes:
            return cached[1]
        stamp = _file_stamp(path)
        if cached is not None and stamp is not None and cached[0] == stamp:
            return cached[1]
        key = load_private_key(path, algorithm, permissions=permissions)
        if stamp is not None or not self._follow_changes:
            with self._lock:
                self._keys[entry] = (stamp, key)
        return key


def generate_key(kind: str = "rsa", bits: int = RECOMMENDED_RSA_BITS) -> tuple[bytes, PrivateKey]:
    """A new signing key.

    Args:
        kind: ``rsa`` or ``ed25519``.
        bits: the RSA modulus size, 1024 to 4096 (RFC 8301 §3.2); ignored for Ed25519.

    Returns:
        the unencrypted PKCS#8 PEM to write to the key file, and the key (with ``path`` "").

    Raises:
        ValueError: unknown kind, or RSA bits outside 1024-4096.
    """
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise ValueError(
                f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits (RFC 8301 §3.2), not {bits}"
            )
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"key type must be rsa or ed25519, not {kind!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, _checked_key("", private, None, ())


def key_record_name(selector: str, domain: str) -> str:
    """Where the key record lives: ``selector._domainkey.domain`` (RFC 6376 §3.6.2.1).

    Args:
        selector: the ``s=`` value; dot-separated sub-domains (RFC 6376 §3.1).
        domain: the ``d=`` domain, at least two labels (RFC 6376 §3.5); a final dot is dropped,
            U-labels become A-labels (RFC 6376 §3.5: d= holds A-labels; domains.py).

    Returns:
        the name, without a final dot.

    Raises:
        ValueError: either is not a valid name, or the whole is too long for DNS.
    """
    domain = domain.removesuffix(".")
    if not domain.isascii():
        domain = to_a_labels(domain)
    _check_labels("selector", selector)
    _check_labels("domain", domain)
    if "." not in domain:
        raise ValueError(f"domain {domain!r}: a DKIM domain has at least two labels (RFC 6376 §3.5)")
    name = f"{selector}._domainkey.{domain}"
    if len(name) > MAX_NAME:
        raise ValueError(f"{name}: longer than {MAX_NAME} characters, too long for DNS (RFC 1035 §2.3.4)")
    return name


def _check_labels(what: str, name: str) -> None:
    for label in name.split("."):
        if len(label) > MAX_LABEL or not _SUB_DOMAIN.fullmatch(label):
            raise ValueError(
                f"{what} {name!r}: each dot-separated part must be 1-{MAX_LABEL} letters, digits "
                "or inner hyphens (RFC 6376 §3.1, RFC 5321 §4.1.2)"
            )


def dns_record(key: PrivateKey, testing: bool = False) -> str:
    """The key record's text (RFC 6376 §3.6.1), e.g. ``v=DKIM1; k=rsa; p=MIIB...``.

    Args:
        key: the signing key.
        testing: add ``t=y`` (verifiers must not treat the domain's mail differently on failure).

    Returns:
        the TXT value, unsplit.
    """
    tags = ["v=DKIM1", f"k={key.key_type}"]
    if testing:
        tags.append("t=y")
    tags.append(f"p={key.public_b64}")
    return "; ".join(tags)


def zone_file_lines(
    selector: str, domain: str, key: PrivateKey, ttl: int | None = None, *, testing: bool = False
) -> str:
    """The key record in zone-file syntax (RFC 1035 §5.1), ready to paste into the domain's zone.

    The value is split into character-strings of at most 255 bytes (RFC 1035 §3.3.14), which
    verifiers join without spaces (RFC 6376 §3.6.2.2); the tags go first, ``p=`` on lines of its own.
    The owner name is absolute, so the lines fit any zone file.

    Args:
        selector, domain: as for :func:`key_record_name`.
        key: the signing key.
        ttl: the record's TTL; None leaves the zone's default.
        testing: add ``t=y``.

    Returns:
        the lines, ending in a newline.

    Raises:
        ValueError: an invalid selector or domain, or a negative TTL.
    """
    name = key_record_name(selector, domain)
    if ttl is not None and ttl < 0:
        raise ValueError(f"TTL must not be negative, not {ttl}")
    value = dns_record(key, testing)
    head, _, key_data = value.partition("p=")
    # Base64 and the tag text contain no '"' or '\', so no escaping is needed.
    strings = [head, *_chunks("p=" + key_data, MAX_CHARACTER_STRING)]
    owner = f"{name}." + (f" {ttl}" if ttl is not None else "")
    quoted = [f'"{s}"' for s in strings]
    body = "\n\t".join(quoted)
    comment = f"; DKIM key {selector} for {domain.removesuffix('.')} ({key.algorithm}, {key.description})"
    return f"{owner} IN TXT ( {body} ) {comment}\n"


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


@dataclass(frozen=True)
class KeyCheck:
    """What :func:`check_published_key` found.

    Attributes:
        ok: the record is usable with this key (no problems).
        problems: what is wrong, in plain words, each with what to do.
        notes: facts worth knowing that are not wrong (testing mode, key size).
    """

    ok: bool
    problems: tuple[str, ...]
    notes: tuple[str, ...]


def check_published_key(key: PrivateKey, txt_records: Sequence[str] | None, dns_error: str = "") -> KeyCheck:
    """Compare the published key record with a private key, as opendkim-testkey does.

    Args:
        key: the private key that signs.
        txt_records: the TXT records at ``selector._domainkey.domain``, each with its strings
            joined; None (or empty) when the name does not exist or has no TXT record.
        dns_error: why the lookup failed (a temporary failure), or "".

    Returns:
        the problems and notes; never raises for malformed records.
    """
    if dns_error:
        return _result([f"the DNS lookup failed ({dns_error}); check the nameserver and try again"], [])
    if not txt_records:
        return _result(
            ["no key record is published (no TXT record at this name): publish the record genkey wrote"], []
        )
    if len(txt_records) > 1:
        return _result(
            [
                f"{len(txt_records)} TXT records are published at this name; there must be exactly one "
                "(RFC 6376 §3.6.2.2: with several, verification is undefined): remove the others"
            ],
            [],
        )
    try:
        tags = _parse_tag_list(txt_records[0])
    except ValueError as e:
        return _result([f"the record is not a valid tag=value list ({e}): {txt_records[0][:60]!r}"], [])
    problems, notes = _check_tags(key, tags)
    problems.extend(_check_public_key(key, tags.get("p")))
    notes.extend(_key_notes(key))
    return _result(problems, notes)


def _result(problems: list[str], notes: list[str]) -> KeyCheck:
    return KeyCheck(not problems, tuple(problems), tuple(notes))


def _parse_tag_list(text: str) -> dict[str, str]:
    """RFC 6376 §3.2 tag-list, keeping order; a duplicate tag makes the whole list invalid."""
    tags: dict[str, str] = {}
    specs = text.split(";")
    if specs and not specs[-1].strip():
        specs.pop()  # the optional final ";"
    for spec in specs:
        name, equals, value = spec.partition("=")
        name = name.strip()
        if not equals or not _TAG_NAME.fullmatch(name):
            raise ValueError(f"{spec.strip()!r} is not tag=value")
        if name in tags:
            raise ValueError(f"tag {name}= appears twice")
        tags[name] = value.strip()
    return tags


def _colon_list(value: str) -> list[str]:
    return [item.strip().lower() for item in value.split(":")]


def _check_tags(key: PrivateKey, tags: dict[str, str]) -> tuple[list[str], list[str]]:
    """Everything in RFC 6376 §3.6.1 except p=: problems and notes."""
    problems: list[str] = []
    notes: list[str] = []
    if "v" in tags and (next(iter(tags)) != "v" or tags["v"] != "DKIM1"):
        problems.append(
            "v= must be the first tag and be DKIM1 (RFC 6376 §3.6.1); verifiers ignore this record"
        )
    if "p" not in tags:
        problems.append("the record has no p= tag, so it is not a DKIM key record")
    key_type = tags.get("k", "rsa").lower()
    if key_type != key.key_type:
        problems.append(
            f"k={key_type} but the private key is {key.key_type}; publish k={key.key_type} (RFC 8463 §4.2)"
        )
    if "h" in tags and "sha256" not in _colon_list(tags["h"]):
        problems.append(f"h={tags['h']} does not allow sha256, which {key.algorithm} uses; add it or drop h=")
    if "s" in tags and not {"email", "*"} & set(_colon_list(tags["s"])):
        problems.append(f"s={tags['s']} excludes email, so verifiers ignore this key for mail")
    flags = _colon_list(tags.get("t", ""))
    if "y" in flags:
        notes.append(
            "t=y (testing) is set: verifiers may treat failing signatures as unsigned; "
            "remove it once signing works (RFC 6376 §3.6.1)"
        )
    if "s" in flags:
        notes.append("t=s is set: the i= domain must be exactly the d= domain")
    return problems, notes


def _check_public_key(key: PrivateKey, published: str | None) -> list[str]:
    if published is None:
        return []
    published = _WHITESPACE.sub("", published)  # FWS is allowed inside base64 (RFC 6376 §3.6.1)
    if not published:
        return ["the key is revoked (empty p=, RFC 6376 §3.6.1): publish the record genkey wrote"]
    try:
        data = base64.b64decode(published, validate=True)
    except (binascii.Error, ValueError):
        return ["p= is not valid base64"]
    ours = base64.b64decode(key.public_b64)
    if data == ours:
        return []
    if key.key_type == "ed25519":
        what = "another Ed25519 key" if len(data) == 32 else f"{len(data)} bytes, not a raw Ed25519 key"
    else:
        what = _describe_rsa_public_key(data, ours)
        if what == "":
            # RFC 6376 §3.6.1's text names RSAPublicKey, but OpenDKIM and others read only the
            # SubjectPublicKeyInfo every key generator publishes.
            return [
                "p= holds the right key as a bare PKCS#1 RSAPublicKey, which some verifiers (OpenDKIM) "
                "cannot read: publish the SubjectPublicKeyInfo form genkey writes"
            ]
    return [
        f"p= ({what}) is not the public half of {key.path or 'the private key'}: publish the record "
        "made for this key, or point the KeyTable to the key this record belongs to"
    ]


def _describe_rsa_public_key(published: bytes, ours: bytes) -> str:
    """What a published key that differs from ours in bytes is; "" when it is ours in PKCS#1 form."""
    try:
        public = serialization.load_der_public_key(published)
    except (ValueError, UnsupportedAlgorithm):
        return "not a DER public key"
    if not isinstance(public, rsa.RSAPublicKey):
        return f"a {type(public).__name__.removeprefix('_')} key"
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if spki == ours:
        return ""
    return f"another RSA key, {public.key_size} bits"


def _key_notes(key: PrivateKey) -> list[str]:
    if key.key_type == "ed25519":
        return ["Ed25519: verifiers that predate RFC 8463 ignore these signatures; sign with an RSA key too"]
    note = f"key size {key.bits} bits"
    if key.bits < RECOMMENDED_RSA_BITS:
        note += f" (RFC 8301 §3.2: SHOULD be at least {RECOMMENDED_RSA_BITS})"
    return [note]
