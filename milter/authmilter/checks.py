"""The interface every check implements, and the registry that orders them.

A check (SPF, HELO, DKIM, ARC, DMARC; later iprev...) is one module holding one :class:`Check`
subclass: its name, the checks whose outcomes it reads (``requires``), the DNS names it will ask
for, declared as soon as the transaction tells them (:meth:`Check.envelope_questions` at MAIL
FROM, :meth:`Check.field_questions` as each header field arrives), how it evaluates, what it
stands for when it fails (:meth:`Check.failed`), and its per-method results for Authentication-Results
(:meth:`Check.method_results`, given the :class:`Decided` context), which the one renderer
(authresults.py) writes.

The pipeline runs the checks of a :class:`Registry` in its declared order, measures each run, and
turns an exception in one check into that check's ``temperror`` (authentication_milter's
``top_*_callback``). A :class:`Registry` refuses an order in which a check comes before one it
requires, as authentication_milter's ``sort_callbacks`` refuses to start.

Checks never import each other: an outcome reaches a later check through ``earlier``, keyed by
the check's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import dns.rdatatype

from authmilter.message import HeaderField
from authmilter.model import Action, MethodResult
from authmilter.resolver import Resolver
from authmilter.transaction import Connection, Transaction

SettingsT = TypeVar("SettingsT")  # the check's settings (its own dataclass, composed by config.py)
OutcomeT = TypeVar("OutcomeT")  # the check's outcome (a typed result from model.py)

# A DNS question a check can name before it runs: (name, type), e.g. ("_dmarc.example.org", TXT).
Question = tuple[str, dns.rdatatype.RdataType]
# Outcomes of the checks that ran before, by check name. A check that is off has none.
Outcomes = Mapping[str, object]


class Decided(NamedTuple):
    """What a check's results for Authentication-Results are written against.

    Attributes:
        action: the action decided for the message.
        client_ip: the SMTP client's address ("" when unknown).
        outcomes: every check's final outcome by name (after the pipeline's post-decision steps,
            e.g. ARC's with the trusted sealer that lifted a DMARC failure).
    """

    action: Action
    client_ip: str = ""
    outcomes: Outcomes = MappingProxyType({})


class Check(Generic[SettingsT, OutcomeT]):
    """One check behind the pipeline's small interface; only ``evaluate``, ``failed`` and
    ``method_results`` must be written, the rest have defaults.

    Attributes:
        name: the registry name (also the key of its outcome and timing).
        label: how logs name it (the DNS budget says which check used it up).
        requires: names of checks that must come earlier (their outcomes are in ``earlier``).
        prefetch_fields: header field names (lower case) that tell the check a DNS name
            (:meth:`field_questions`), e.g. ``{"from"}``.
        results_after: names of checks whose resinfos come before this one's in the header,
            though this one runs first (ARC runs before DMARC, and is written after it).
    """

    name: ClassVar[str]
    label: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    results_after: ClassVar[tuple[str, ...]] = ()
    prefetch_fields: ClassVar[frozenset[str]] = frozenset()

    def enabled(self, settings: SettingsT) -> bool:
        """Whether the check runs at all with these settings (default: always)."""
        return True

    def envelope_questions(
        self, connection: Connection, mail_from: str, settings: SettingsT
    ) -> list[Question]:
        """DNS names the check will ask for, known at MAIL FROM (none by default).

        Only a hint for prefetching (the check still asks in its own order): a record, never
        what evaluating it would ask next.
        """
        return []

    def field_questions(self, field: HeaderField, settings: SettingsT) -> list[Question]:
        """DNS names a header field named in ``prefetch_fields`` tells (none by default)."""
        return []

    def prefetch(self, transaction: Transaction, settings: SettingsT) -> list[Question]:
        """Every name the whole message tells at once: its envelope's, then its fields' (a message
        read whole, as ``authmilter check`` does, tells them all at end of message)."""
        questions = self.envelope_questions(transaction.connection, transaction.mail_from, settings)
        if self.prefetch_fields:  # most checks read no field
            for field in transaction.message.headers.named(self.prefetch_fields):
                questions.extend(self.field_questions(field, settings))
        return questions

    def precheck(self, transaction: Transaction, settings: SettingsT) -> OutcomeT | None:
        """An outcome known without DNS that may decide the message at once, else None (default)."""
        return None

    def evaluate(
        self, transaction: Transaction, earlier: Outcomes, resolver: Resolver, settings: SettingsT
    ) -> OutcomeT:
        """The check's outcome for one message.

        Args:
            transaction: the message, its envelope and connection.
            earlier: outcomes of the checks that ran before (those in ``requires`` when on).
            resolver: the message's view of the resolver (its DNS budget applies).
            settings: the check's settings.
        """
        raise NotImplementedError

    def failed(self, transaction: Transaction, settings: SettingsT, reason: str) -> OutcomeT:
        """What the check stands for when it raised: its ``temperror`` with ``reason``."""
        raise NotImplementedError

    def method_results(self, outcome: OutcomeT, decided: Decided) -> tuple[MethodResult, ...]:
        """The check's resinfos for Authentication-Results, given the action decided."""
        raise NotImplementedError


@dataclass(frozen=True)
class Registration:
    """A check in a registry, with how to find its settings in the configuration.

    Attributes:
        check: the check.
        settings: picks the check's settings out of the configuration (``lambda c: c.spf``).
    """

    check: Check[Any, Any]
    settings: Callable[[Any], Any]


class Registry:
    """The checks a pipeline runs, in their declared order (also the order of their resinfos).

    Args:
        registrations: the checks, in order.

    Raises:
        ValueError: two checks share a name, a check comes before one it requires, or checks
            want their results after each other's.
    """

    def __init__(self, registrations: Iterable[Registration] = ()) -> None:
        self._registrations: tuple[Registration, ...] = ()
        for registration in registrations:
            self._registrations = self._validated(registration)
        self._header_order = self._placed_in_header()

    def register(self, check: Check[Any, Any], settings: Callable[[Any], Any]) -> Registry:
        """A new registry with ``check`` added last.

        Raises:
            ValueError: as for the constructor.
        """
        return Registry((*self._registrations, Registration(check, settings)))

    def _validated(self, registration: Registration) -> tuple[Registration, ...]:
        known = [r.check.name for r in self._registrations]
        check = registration.check
        if check.name in known:
            raise ValueError(f"check {check.name!r} is registered twice")
        missing = [name for name in check.requires if name not in known]
        if missing:
            raise ValueError(
                f"check {check.name!r} requires {', '.join(missing)}, which must be registered before it"
            )
        return (*self._registrations, registration)

    def __iter__(self) -> Iterator[Registration]:
        return iter(self._registrations)

    def header_order(self) -> tuple[Registration, ...]:
        """The checks in the order of their resinfos: the run order, except that a check with
        ``results_after`` comes right after the last of those checks that is registered."""
        return self._header_order

    def _placed_in_header(self) -> tuple[Registration, ...]:
        names = {r.check.name for r in self._registrations}
        placed: list[Registration] = []
        waiting = list(self._registrations)
        while waiting:
            done = {r.check.name for r in placed}
            ready = [r for r in waiting if all(n in done or n not in names for n in r.check.results_after)]
            if not ready:
                cycle = ", ".join(r.check.name for r in waiting)
                raise ValueError(f"checks {cycle} each want their results after another's")
            waiting.remove(ready[0])
            placed.append(ready[0])
        return tuple(placed)
