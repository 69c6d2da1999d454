"""The personal-data marker: which fields of an event hold personal data, and whose data it is.

The domain only declares; the event store's mapper (:mod:`eventstore.personal`) encrypts the named
fields with the subject's own data key, so that forgetting the subject (destroying that key) makes
every stored copy of them unreadable while the events themselves stay untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a personal field reads as once its subject was forgotten (the data key is gone).
ERASED = "[erased]"


@dataclass(frozen=True, slots=True)
class PersonalData:
    """Set as ``personal_data`` on an event class: ``fields`` are encrypted per ``subject``.

    ``subject`` names the event attribute whose value identifies the data subject (the owner of the
    data key): the aggregate's own id by default, or e.g. ``customer_id`` on another aggregate's event.
    ``redacted`` is what each field reads as after the subject was forgotten.
    """

    fields: tuple[str, ...]
    subject: str = "originator_id"
    redacted: str = ERASED
