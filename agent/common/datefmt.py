"""Dates as upstream prints them (``openssl x509 -enddate``) and ISO-8601 UTC."""

from __future__ import annotations

import datetime as dt
import re

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUMBER = {m.lower(): n for n, m in enumerate(MONTHS, 1)}
_OPENSSL_DATE = re.compile(r"([a-z]{3}) (\d\d?) (\d\d?):(\d\d?):(\d\d?) (\d{4}) gmt", re.IGNORECASE)


def openssl_date(when: dt.datetime) -> str:
    """``notAfter`` as ``openssl x509 -enddate`` prints it: ``Jun  7 16:28:00 2027 GMT``."""
    w = when.astimezone(dt.UTC)
    return f"{MONTHS[w.month - 1]} {w.day:2d} {w:%H:%M:%S} {w.year} GMT"


def parse_openssl_date(text: str) -> dt.datetime:
    """The UTC time of an ``openssl x509 -enddate`` date; ValueError if it is not one.

    Accepts what ``strptime(text, "%b %d %H:%M:%S %Y GMT")`` accepts (whitespace runs
    count as one space), without loading ``_strptime`` (``ced ping`` checks every expiry).
    """
    m = _OPENSSL_DATE.fullmatch(" ".join(text.split()))
    month = _MONTH_NUMBER.get(m.group(1).lower()) if m is not None else None
    if m is None or month is None:
        raise ValueError(f"not an openssl date: {text!r}")
    day, hour, minute, second, year = (int(m.group(i)) for i in range(2, 7))
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
