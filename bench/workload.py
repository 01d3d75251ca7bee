"""The realistic workload (issue 11): thousands of sender domains, Zipf-drawn, each signing with its own key.

An MX sees a few senders often and a long tail of senders once: every cold name costs the milter a DNS
round trip and its parsing work, which a one-sender benchmark never shows. This module makes the
senders, their DNS records (zone-file lines for the bench's ``example.`` zone) and the messages, and
knows what every sender's Authentication-Results must say.

Sender kinds, by share of the population (each sender's kind is fixed by its number):

- ``reject`` (55 %): ``sN.example``, SPF ``ip4:<client> -all`` (or, for every third, an include of a
  shared provider record, as senders behind a big ESP have), DMARC ``p=reject``: spf, dkim, dmarc pass.
- ``subdomain`` (20 %): ``mail.oN.example``; the DMARC record is at ``_dmarc.oN.example`` only, so the
  policy comes from the tree walk (RFC 9989 §4.10) or the public suffix list (OpenDMARC): all pass.
- ``none`` (10 %): ``nN.example`` with ``p=none`` and SPF ``~all`` without the client: spf=softfail, dkim
  and dmarc pass (DKIM is aligned).
- ``unpublished`` (15 %): ``uN.example`` without any DMARC record: spf and dkim pass, dmarc=none.

Every domain publishes its own selector record ``kK._domainkey.<domain>``; the key behind it is one of a
few RSA-2048 keys generated per run (generating thousands would take minutes; the milters cannot tell,
since each domain's record is its own DNS name and is fetched and parsed per domain).
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import _paths  # noqa: F401  (puts the harness on sys.path)
from load import body_text, wire_form

from signing import SigningKey, make_message, sign, zone_txt

PARENT = "example"  # the Knot zone every sender lives in
PROVIDER_SPF = "_spf.provider"  # the include of the ESP-hosted senders, relative to PARENT
PASS = {"spf": "pass", "dkim": "pass", "dmarc": "pass"}
# Message sizes: (share, smallest, largest) in bytes of body; most mail is small, some is large.
SIZE_CLASSES = ((0.6, 2 * 1024, 8 * 1024), (0.3, 8 * 1024, 32 * 1024), (0.1, 32 * 1024, 128 * 1024))


@dataclass(frozen=True)
class Sender:
    """One sender domain: its records and the results every milter must report for its mail."""

    number: int
    kind: str  # reject | subdomain | none | unpublished
    domain: str  # the MAIL FROM, From and DKIM d= domain
    selector: str
    key_index: int
    expected: dict[str, str]

    @property
    def address(self) -> str:
        return f"news@{self.domain}"


def make_senders(count: int, key_count: int) -> list[Sender]:
    """``count`` senders; sender 0 is always a plain ``reject`` sender (the one-sender run's)."""
    return [_sender(number, key_count) for number in range(count)]


def _sender(number: int, key_count: int) -> Sender:
    share = (number * 37) % 100  # spreads the kinds evenly over any prefix of the numbers
    key_index, selector = number % key_count, f"k{number % key_count}"
    if number == 0 or share < 55:
        return Sender(number, "reject", f"s{number}.{PARENT}", selector, key_index, PASS)
    if share < 75:
        return Sender(number, "subdomain", f"mail.o{number}.{PARENT}", selector, key_index, PASS)
    if share < 85:
        expected = {"spf": "softfail", "dkim": "pass", "dmarc": "pass"}
        return Sender(number, "none", f"n{number}.{PARENT}", selector, key_index, expected)
    expected = {"spf": "pass", "dkim": "pass", "dmarc": "none"}
    return Sender(number, "unpublished", f"u{number}.{PARENT}", selector, key_index, expected)


def zone_lines(senders: Sequence[Sender], keys: Sequence[SigningKey], client_ip: str) -> str:
    """Every sender's SPF, DKIM key and DMARC records, as lines of the ``example.`` zone file."""
    lines = [f"{PROVIDER_SPF} TXT {zone_txt(f'v=spf1 ip4:{client_ip} -all')}"]
    for sender in senders:
        name = sender.domain.removesuffix(f".{PARENT}")
        if sender.kind == "none":
            spf = "v=spf1 ip4:192.0.2.1 ~all"
        elif sender.number % 3 == 1:
            spf = f"v=spf1 include:{PROVIDER_SPF}.{PARENT} -all"
        else:
            spf = f"v=spf1 ip4:{client_ip} -all"
        lines.append(f"{name} TXT {zone_txt(spf)}")
        lines.append(
            f"{sender.selector}._domainkey.{name} TXT {zone_txt(keys[sender.key_index].txt_record())}"
        )
        if sender.kind == "reject":
            lines.append(f"_dmarc.{name} TXT {zone_txt('v=DMARC1; p=reject')}")
        elif sender.kind == "subdomain":
            organization = name.removeprefix("mail.")
            lines.append(f"_dmarc.{organization} TXT {zone_txt('v=DMARC1; p=quarantine')}")
        elif sender.kind == "none":
            lines.append(f"_dmarc.{name} TXT {zone_txt('v=DMARC1; p=none')}")
    return "\n".join(lines)


def zipf_draws(count: int, population: int, exponent: float, rng: random.Random) -> list[int]:
    """``count`` sender numbers, P(rank r) ∝ 1/r^exponent: a few repeat, most of the tail is cold."""
    weights = [1.0 / rank**exponent for rank in range(1, population + 1)]
    cumulative = list(itertools.accumulate(weights))
    return [bisect.bisect_left(cumulative, rng.random() * cumulative[-1]) for _ in range(count)]


def body_size(rng: random.Random) -> int:
    pick, total = rng.random(), 0.0
    for share, smallest, largest in SIZE_CLASSES:
        total += share
        if pick < total:
            return rng.randint(smallest, largest)
    return SIZE_CLASSES[-1][2]


@dataclass(frozen=True)
class Envelope:
    """One message ready to send: its envelope sender, DATA payload, and whom it is from."""

    mail_from: str
    payload: bytes
    sender: Sender


def make_envelopes(
    draws: Sequence[int],
    senders: Sequence[Sender],
    keys: Sequence[SigningKey],
    rng: random.Random,
) -> list[Envelope]:
    """A message per draw, from the drawn sender, of a varied size, signed with that sender's key."""
    envelopes = []
    for number, drawn in enumerate(draws):
        sender = senders[drawn]
        text = body_text(body_size(rng), rng)
        message = make_message(f"News <{sender.address}>", subject=f"Benchmark message {number}", body=text)
        signed = sign(message, keys[sender.key_index], sender.domain, sender.selector)
        envelopes.append(Envelope(sender.address, wire_form(signed), sender))
    return envelopes
