"""Times as the FlexAI API writes them: RFC 3339 in UTC with a ``Z``, e.g. ``2026-11-29T01:50:07Z``.

The one writer and reader of the provisioner's side (the client, the CLI, the server
extension). The emulator keeps its own writer on purpose: it stands in for another party's
server and imports nothing of the provisioner.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

__all__ = ["format_time", "parse_time"]


def format_time(
    moment: datetime | float, *, timespec: Literal["seconds", "milliseconds"] = "seconds"
) -> str:
    """A datetime (a naive one taken as UTC) or a Unix time, in UTC.

    Seconds, as the API writes; ``timespec="milliseconds"`` keeps the fraction
    (``...:07.250Z``) for events less than a second apart.
    """
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    elif moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    text = moment.astimezone(timezone.utc).isoformat(timespec=timespec)
    return text.replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """The time ``text`` names, with its zone; ValueError if it is not RFC 3339 or has no zone."""
    try:  # Python 3.10's fromisoformat does not read "Z"
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return parsed
