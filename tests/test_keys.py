"""keys.py: loading and refusing key files, the cache, genkey's output, and the published-key check."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from pathlib import Path

import dkim
import dns.rdatatype
import dns.zone
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authmilter.keys import (
    KeyCache,
    KeyFileError,
    PrivateKey,
    check_published_key,
    dns_record,
    generate_key,
    key_record_name,
    load_private_key,
    zone_file_lines,
)
from signing import make_message, small_rsa_key

NO_ENCRYPTION = serialization.NoEncryption()


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def write_key(tmp_path: Path) -> Callable[..., str]:
    """Write bytes to a fresh file with the given mode; return its path."""
    counter = iter(range(1000))

    def write(data: bytes, mode: int = 0o600, name: str = "") -> str:
        path = tmp_path / (name or f"key{next(counter)}.private")
        path.write_bytes(data)
        path.chmod(mode)
        return str(path)

    return write


def pem(
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey, fmt: str = "pkcs8"
) -> bytes:
    private_format = {
        "pkcs8": serialization.PrivateFormat.PKCS8,
        "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL,
    }[fmt]
    return key.private_bytes(serialization.Encoding.PEM, private_format, NO_ENCRYPTION)


def spki_b64(key: rsa.RSAPrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def dkimpy_round_trip(key: PrivateKey) -> bool:
    """Sign with what keys.py hands dkimpy, verify against dns_record(): the formats fit together."""
    message = make_message()
    signature = dkim.sign(
        message,
        b"s1",
        b"sender.example",
        key.dkim_private,
        signature_algorithm=key.algorithm.encode(),
        include_headers=[b"from", b"subject"],
    )
    record = dns_record(key).encode()
    return bool(dkim.verify(signature + message, dnsfunc=lambda name, timeout=5: record))


# --- loading -----------------------------------------------------------------------------------


def test_rsa_pkcs8_key_loads_and_signs(rsa2048: rsa.RSAPrivateKey, write_key: Callable[..., str]) -> None:
    path = write_key(pem(rsa2048))
    key = load_private_key(path)
    assert (key.path, key.algorithm, key.bits, key.warnings) == (path, "rsa-sha256", 2048, ())
    assert key.public_b64 == spki_b64(rsa2048)
    assert key.dkim_private.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert dkimpy_round_trip(key)


def test_pkcs1_pkcs8_and_der_give_the_same_key(
    rsa2048: rsa.RSAPrivateKey, write_key: Callable[..., str]
) -> None:
    der = rsa2048.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, NO_ENCRYPTION)
    keys = [load_private_key(write_key(data)) for data in (pem(rsa2048, "pkcs1"), pem(rsa2048), der)]
    assert len({(k.public_b64, k.dkim_private) for k in keys}) == 1


def test_rsa_1024_is_accepted(rsa1024: rsa.RSAPrivateKey, write_key: Callable[..., str]) -> None:
    key = load_private_key(write_key(pem(rsa1024)), "rsa-sha256")
    assert key.bits == 1024
    assert dkimpy_round_trip(key)


def test_rsa_under_1024_bits_is_refused(write_key: Callable[..., str]) -> None:
    path = write_key(pem(small_rsa_key(768)))
    with pytest.raises(KeyFileError, match=r"768 bits; RFC 8301 §3\.2 requires at least 1024") as e:
        load_private_key(path)
    assert str(e.value).startswith(f"{path}: ")


def test_ed25519_key_loads_and_signs(
    ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    key = load_private_key(write_key(pem(ed_key)))
    raw_public = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert (key.algorithm, key.bits, key.key_type) == ("ed25519-sha256", 256, "ed25519")
    assert base64.b64decode(key.public_b64) == raw_public  # RFC 8463 §4.2: the raw 32 bytes
    assert len(base64.b64decode(key.dkim_private)) == 32  # the seed, as dkimpy's nacl signer takes it
    assert dkimpy_round_trip(key)


def test_dkimpy_milter_ed25519_seed_file_loads(
    ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, NO_ENCRYPTION)
    from_seed = load_private_key(write_key(base64.b64encode(seed) + b"\n"), "ed25519-sha256")
    assert from_seed.public_b64 == load_private_key(write_key(pem(ed_key))).public_b64


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602])
def test_key_others_may_read_or_write_is_refused(
    mode: int, ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    path = write_key(pem(ed_key), mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}.*chmod 600"):
        load_private_key(path)


def test_permissions_warn_and_ignore(
    ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    path = write_key(pem(ed_key), 0o644)
    (warning,) = load_private_key(path, permissions="warn").warnings
    assert warning.startswith(f"{path}: ") and "0644" in warning
    assert load_private_key(path, permissions="ignore").warnings == ()
    with pytest.raises(ValueError, match="permissions must be one of"):
        load_private_key(path, permissions="allow")


@pytest.mark.parametrize(
    ("which", "algorithm", "expected"),
    [
        ("rsa", "ed25519-sha256", "the algorithm is ed25519-sha256 but this is an RSA 1024 bits key"),
        ("ed", "rsa-sha256", "the algorithm is rsa-sha256 but this is an Ed25519 key"),
        ("rsa", "rsa-sha1", "unknown algorithm 'rsa-sha1'"),
    ],
)
def test_wrong_algorithm_for_the_key_is_refused(
    which: str,
    algorithm: str,
    expected: str,
    rsa1024: rsa.RSAPrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    write_key: Callable[..., str],
) -> None:
    path = write_key(pem(rsa1024 if which == "rsa" else ed_key))
    with pytest.raises(KeyFileError, match=expected):
        load_private_key(path, algorithm)


def test_ec_key_is_refused(write_key: Callable[..., str]) -> None:
    path = write_key(pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyFileError, match="DKIM signs with RSA or Ed25519 only"):
        load_private_key(path)


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_encrypted_key_is_refused(
    fmt: serialization.PrivateFormat, rsa1024: rsa.RSAPrivateKey, write_key: Callable[..., str]
) -> None:
    data = rsa1024.private_bytes(
        serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"secret")
    )
    with pytest.raises(KeyFileError, match="encrypted with a passphrase"):
        load_private_key(write_key(data))


@pytest.mark.parametrize("inline", ["pem", "base64"])
def test_inline_key_data_is_refused_without_echoing_it(inline: str, rsa1024: rsa.RSAPrivateKey) -> None:
    text = pem(rsa1024).decode()
    if inline == "base64":
        text = "".join(text.splitlines()[1:-1])
    with pytest.raises(KeyFileError, match="key data given inline") as e:
        load_private_key(text)
    assert text[20:60] not in str(e.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read the key file: No such file"),
        (b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n", "not a usable PEM"),
        (b"\x00\x01garbage", r"not a usable DER \(no PEM header found\)"),
        (b"x" * (64 * 1024 + 1), "not a private key file"),
    ],
)
def test_unusable_files_are_refused(
    content: bytes | None, expected: str, tmp_path: Path, write_key: Callable[..., str]
) -> None:
    path = str(tmp_path / "missing.private") if content is None else write_key(content)
    with pytest.raises(KeyFileError, match=expected):
        load_private_key(path)


def test_public_key_file_is_refused(rsa1024: rsa.RSAPrivateKey, write_key: Callable[..., str]) -> None:
    public = rsa1024.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyFileError, match="this is a public key"):
        load_private_key(write_key(public))


@pytest.mark.parametrize("path", ["/dev/null", "/tmp"])
def test_non_regular_files_are_refused(path: str) -> None:
    with pytest.raises(KeyFileError, match=f"^{path}: "):
        load_private_key(path, permissions="ignore")


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_private_key(str(fifo))


def test_private_key_repr_hides_the_secret(
    ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    key = load_private_key(write_key(pem(ed_key)))
    assert key.dkim_private.decode() not in repr(key)


# --- the cache ---------------------------------------------------------------------------------


def test_cache_reuses_an_unchanged_key_and_rereads_a_changed_one(
    rsa1024: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    cache = KeyCache()
    path = write_key(pem(rsa1024))
    first = cache.get(path, None, "refuse")
    assert cache.get(path, None, "refuse") is first
    Path(path).write_bytes(pem(ed_key))
    os.utime(path, ns=(0, 1))  # a different mtime even on a coarse clock
    assert cache.get(path, None, "refuse").algorithm == "ed25519-sha256"


def test_snapshot_cache_keeps_the_loaded_key_until_replaced_whole(
    rsa1024: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    """The daemon's cache: a key file edited or removed after start changes nothing (SIGHUP does)."""
    cache = KeyCache(follow_changes=False)
    path = write_key(pem(rsa1024))
    first = cache.get(path, None, "refuse")
    Path(path).write_bytes(b"-----BEGIN PRIVATE KEY-----\nhalf writ")  # an edit in progress
    os.utime(path, ns=(0, 1))
    assert cache.get(path, None, "refuse") is first
    os.unlink(path)
    assert cache.get(path, None, "refuse") is first
    assert (
        KeyCache(follow_changes=False).get(write_key(pem(ed_key)), None, "refuse").algorithm
        == "ed25519-sha256"
    )


def test_cache_notices_a_chmod_and_does_not_cache_errors(
    ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    cache = KeyCache()
    path = write_key(pem(ed_key))
    cache.get(path, None, "refuse")
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="0644"):
        cache.get(path, None, "refuse")
    os.chmod(path, 0o600)
    assert cache.get(path, None, "refuse").warnings == ()


def test_cache_keys_on_algorithm_and_permissions(
    ed_key: ed25519.Ed25519PrivateKey, write_key: Callable[..., str]
) -> None:
    cache = KeyCache()
    path = write_key(pem(ed_key), 0o640)
    assert cache.get(path, None, "warn").warnings
    with pytest.raises(KeyFileError):
        cache.get(path, None, "refuse")
    with pytest.raises(KeyFileError):
        cache.get(path, "rsa-sha256", "warn")


# --- generating ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "bits", "algorithm", "key_bits"),
    [("rsa", 1024, "rsa-sha256", 1024), ("ed25519", 9, "ed25519-sha256", 256)],
)
def test_generate_key_writes_pkcs8_that_loads_back(
    kind: str, bits: int, algorithm: str, key_bits: int, write_key: Callable[..., str]
) -> None:
    data, key = generate_key(kind, bits)
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert (key.path, key.algorithm, key.bits) == ("", algorithm, key_bits)
    loaded = load_private_key(write_key(data))
    assert (loaded.public_b64, loaded.dkim_private) == (key.public_b64, key.dkim_private)


@pytest.mark.parametrize(("kind", "bits"), [("rsa", 1023), ("rsa", 4097), ("dsa", 2048)])
def test_generate_key_refuses_bad_parameters(kind: str, bits: int) -> None:
    with pytest.raises(ValueError, match=r"RSA keys must have 1024 to 4096 bits|key type must be"):
        generate_key(kind, bits)


# --- record text ---------------------------------------------------------------------------------


def fake_key(public_b64: str, algorithm: str = "rsa-sha256") -> PrivateKey:
    return PrivateKey("/k", algorithm, 2048, b"", public_b64)


def test_dns_record_text() -> None:
    assert dns_record(fake_key("QUJD")) == "v=DKIM1; k=rsa; p=QUJD"
    assert dns_record(fake_key("QUJD", "ed25519-sha256"), testing=True) == "v=DKIM1; k=ed25519; t=y; p=QUJD"


def test_key_record_name() -> None:
    assert key_record_name("s1", "example.com.") == "s1._domainkey.example.com"
    assert key_record_name("2026.a", "mail.example.org") == "2026.a._domainkey.mail.example.org"


@pytest.mark.parametrize(
    ("selector", "domain"),
    [
        ("s 1", "example.com"),
        ('s"1', "example.com"),
        ("s1", "exa_mple.com"),
        ("s1", "localhost"),
        ("-s1", "example.com"),
        ("s1", "a" * 64 + ".com"),
        ("s1", ".".join(["a" * 60] * 4) + ".com"),
        ("", "example.com"),
    ],
)
def test_key_record_name_refuses_invalid_names(selector: str, domain: str) -> None:
    with pytest.raises(ValueError):
        key_record_name(selector, domain)


def parse_zone_lines(text: str) -> tuple[list[bytes], int]:
    # A real zone file sets $TTL; the lines leave the TTL to it unless given one.
    zone = dns.zone.from_text(
        "$TTL 300\n" + text, origin="example.com.", relativize=False, check_origin=False
    )
    rdataset = zone.find_rdataset("s1._domainkey.example.com.", dns.rdatatype.TXT)
    (rdata,) = rdataset
    return list(rdata.strings), rdataset.ttl


@pytest.mark.parametrize("length", [1, 253, 254, 255, 600, 1000])
def test_zone_file_lines_parse_and_join_back_to_the_record(length: int) -> None:
    key = fake_key("A" * length)
    strings, ttl = parse_zone_lines(zone_file_lines("s1", "example.com", key))
    assert ttl == 300
    assert all(len(s) <= 255 for s in strings)
    assert b"".join(strings).decode() == dns_record(key)
    assert strings[0] == b"v=DKIM1; k=rsa; "
    assert len(strings) == 1 + -(-(length + 2) // 255)


def test_zone_file_lines_of_a_real_key_with_ttl_and_testing(
    rsa2048: rsa.RSAPrivateKey, write_key: Callable[..., str]
) -> None:
    key = load_private_key(write_key(pem(rsa2048)))
    text = zone_file_lines("s1", "example.com.", key, 3600, testing=True)
    assert text.startswith("s1._domainkey.example.com. 3600 IN TXT (")
    strings, ttl = parse_zone_lines(text)
    assert ttl == 3600
    assert b"".join(strings).decode() == dns_record(key, testing=True)


def test_zone_file_lines_refuse_a_negative_ttl() -> None:
    with pytest.raises(ValueError, match="TTL"):
        zone_file_lines("s1", "example.com", fake_key("QUJD"), -1)


# --- the published-key check --------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key(rsa2048: rsa.RSAPrivateKey, tmp_path_factory: pytest.TempPathFactory) -> PrivateKey:
    path = tmp_path_factory.mktemp("keys") / "rsa.private"
    path.write_bytes(pem(rsa2048))
    path.chmod(0o600)
    return load_private_key(str(path))


@pytest.fixture(scope="module")
def ed_private() -> PrivateKey:
    _, key = generate_key("ed25519")
    return key


def test_matching_record_is_ok(rsa_key: PrivateKey) -> None:
    check = check_published_key(rsa_key, [dns_record(rsa_key)])
    assert check.ok and check.problems == ()
    assert check.notes == ("key size 2048 bits",)


def test_testing_flag_and_small_key_are_notes(
    rsa_key: PrivateKey, rsa1024: rsa.RSAPrivateKey, write_key: Callable[..., str]
) -> None:
    check = check_published_key(rsa_key, [dns_record(rsa_key, testing=True)])
    assert check.ok and check.notes[0].startswith("t=y (testing) is set")
    small = load_private_key(write_key(pem(rsa1024)))
    assert "SHOULD be at least 2048" in check_published_key(small, [dns_record(small)]).notes[0]


def test_ed25519_match_notes_dual_signing(ed_private: PrivateKey) -> None:
    check = check_published_key(ed_private, [dns_record(ed_private)])
    assert check.ok
    assert "sign with an RSA key too" in check.notes[0]


@pytest.mark.parametrize(
    "record",
    [
        "v=DKIM1; k=rsa; p={p};",  # optional final ";"
        "v=DKIM1;k=rsa;h=sha1:sha256;s=email;p={p}",
        "p={p}",  # v= and k= are optional (k defaults to rsa)
        "v=DKIM1; s=*; n=a note; p={p}",
        "v=DKIM1; k=rsa; p={p_folded}",  # FWS inside base64
    ],
)
def test_valid_record_variants_are_ok(record: str, rsa_key: PrivateKey) -> None:
    p = rsa_key.public_b64
    text = record.format(p=p, p_folded=f"{p[:100]} \t {p[100:]}")
    assert check_published_key(rsa_key, [text]).ok


def one_problem(key: PrivateKey, records: list[str] | None, dns_error: str = "") -> str:
    check = check_published_key(key, records, dns_error)
    assert not check.ok
    (problem,) = check.problems
    return problem


def test_missing_record(rsa_key: PrivateKey) -> None:
    assert one_problem(rsa_key, None).startswith("no key record is published")
    assert one_problem(rsa_key, []).startswith("no key record is published")


def test_dns_failure(rsa_key: PrivateKey) -> None:
    assert "DNS lookup failed (timeout asking 192.0.2.1)" in one_problem(
        rsa_key, None, "timeout asking 192.0.2.1"
    )


def test_several_records(rsa_key: PrivateKey) -> None:
    problem = one_problem(rsa_key, [dns_record(rsa_key), "v=spf1 -all"])
    assert problem.startswith("2 TXT records are published")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ("hello world", "not a valid tag=value list"),
        ("v=DKIM1; p={p}; p={p}", "tag p= appears twice"),
        ("1x=2; p={p}", "not a valid tag=value list"),
        ("v=DKIM2; p={p}", "v= must be the first tag and be DKIM1"),
        ("k=rsa; v=DKIM1; p={p}", "v= must be the first tag"),
        ("v=DKIM1; k=rsa", "no p= tag"),
        ("v=DKIM1; k=rsa; p=", "the key is revoked"),
        ("v=DKIM1; k=ed25519; p={p}", "k=ed25519 but the private key is rsa"),
        ("v=DKIM1; h=sha1; p={p}", "h=sha1 does not allow sha256"),
        ("v=DKIM1; s=tlsrpt; p={p}", "s=tlsrpt excludes email"),
        ("v=DKIM1; p=not*base64", "p= is not valid base64"),
        ("v=DKIM1; p=QUJD", r"p= \(not a DER public key\) is not the public half of /"),
    ],
)
def test_record_problems(record: str, expected: str, rsa_key: PrivateKey) -> None:
    assert re.search(expected, one_problem(rsa_key, [record.format(p=rsa_key.public_b64)]))


def test_another_rsa_key(rsa_key: PrivateKey, rsa1024: rsa.RSAPrivateKey) -> None:
    problem = one_problem(rsa_key, [f"v=DKIM1; p={spki_b64(rsa1024)}"])
    assert problem.startswith(f"p= (another RSA key, 1024 bits) is not the public half of {rsa_key.path}")


def test_same_rsa_key_as_bare_pkcs1_is_a_problem(rsa_key: PrivateKey, rsa2048: rsa.RSAPrivateKey) -> None:
    pkcs1 = rsa2048.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    problem = one_problem(rsa_key, [f"v=DKIM1; p={base64.b64encode(pkcs1).decode()}"])
    assert "bare PKCS#1 RSAPublicKey" in problem


def test_ed25519_mismatches(ed_private: PrivateKey, ed_key: ed25519.Ed25519PrivateKey) -> None:
    other_raw = ed_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    other_spki = ed_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    another = one_problem(ed_private, [f"v=DKIM1; k=ed25519; p={base64.b64encode(other_raw).decode()}"])
    assert another.startswith("p= (another Ed25519 key)")
    spki = one_problem(ed_private, [f"v=DKIM1; k=ed25519; p={base64.b64encode(other_spki).decode()}"])
    assert spki.startswith("p= (44 bytes, not a raw Ed25519 key)")
    assert one_problem(ed_private, [f"v=DKIM1; p={ed_private.public_b64}"]).startswith(
        "k=rsa but the private key is ed25519"
    )
