"""Dates as upstream prints them (``openssl x509 -enddate``) and ISO-8601 UTC."""

from __future__ import annotations

import datetime as dt

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def openssl_date(when: dt.datetime) -> str:
    """``notAfter`` as ``openssl x509 -enddate`` prints it: ``Jun  7 16:28:00 2027 GMT``."""
    w = when.astimezone(dt.UTC)
    return f"{MONTHS[w.month - 1]} {w.day:2d} {w:%H:%M:%S} {w.year} GMT"


def parse_openssl_date(text: str) -> dt.datetime:
    return dt.datetime.strptime(" ".join(text.split()), "%b %d %H:%M:%S %Y GMT").replace(
        tzinfo=dt.UTC
    )
