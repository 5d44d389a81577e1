"""`--redact-pii`: replace e-mail addresses, phone numbers, IP addresses and card numbers in text.

    from clusterlm.data.pii import PIIRedactor
    r = PIIRedactor()
    r.redact("mail bob@example.org or call +1 415 555 0100")
    # -> ("mail <EMAIL> or call <PHONE>", {"email": 1, "phone": 1, ...})

Each match is replaced by a fixed placeholder (plain text, not a special token; a BPE or char
tokenizer sees it as ordinary characters):

    kind    placeholder    what matches
    email   <EMAIL>        local@domain.tld (ASCII local part and domain, TLD of 2+ letters)
    ipv6    <IPV6>         a valid IPv6 address (checked with `ipaddress`) with at least 3 hex
                           groups, so "fe80::1", "::1" and C++ scopes like "a::b" are left alone
    ipv4    <IPV4>         four dotted numbers 0-255, not part of a longer dotted number run
                           ("1.2.3.4.5" and version strings like "v1.2.3" are left alone)
    card    <CARD>         13-19 digits, optionally grouped by single spaces or dashes, that pass
                           the Luhn checksum (all payment card numbers do; about 9 in 10 random
                           digit runs do not, which keeps order numbers and IDs mostly intact)
    phone   <PHONE>        "+" then 7-15 digits in groups separated by single spaces, dots, dashes
                           or parentheses (E.164 style), or the North American grouping
                           "(415) 555-0100" / "415-555-0100" / "415.555.0100"

Kinds are applied in the order above, so a part of the text already replaced is not matched
again. Known limits: national phone formats without "+" other than the 3-3-4 grouping, e-mail
addresses with non-ASCII characters, and card numbers with other separators are not caught;
a 13-19 digit run that happens to pass Luhn is redacted even if it is not a card number.
Redaction works on documents of any length: every pattern is linear-time (no nested repetition).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

PLACEHOLDERS: dict[str, str] = {
    "email": "<EMAIL>",
    "ipv6": "<IPV6>",
    "ipv4": "<IPV4>",
    "card": "<CARD>",
    "phone": "<PHONE>",
}
KINDS = tuple(PLACEHOLDERS)  # also the order in which they are applied

_EMAIL = re.compile(
    # local part: Unicode letters too (RFC 6531), so "jöhn@..." is replaced whole, not from "hn@" on
    r"(?u:(?<![\w.%+-])[^\W_](?:[\w.%+-]{0,63}))@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])", re.ASCII)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)", re.ASCII)
# IPv6 candidates: a run of hex digits and colons with two colons among its first groups,
# optionally ending in an embedded IPv4; each candidate is validated by `ipaddress`.
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:]{2,39}"
                   r"(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)", re.ASCII)
# 13-19 digits with optional single space/dash separators, not part of a longer digit run
_CARD = re.compile(r"(?<![\w+-])(?<!\d[ -])\d(?:[ -]?\d){12,18}(?![\w-]|[ -]\d)", re.ASCII)
_PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,6}(?!\w)"  # +CC then digit groups
    # NANP 3-3-4, with an optional leading "1-" and a trailing extension ("x123", "ext. 12")
    r"|(?<![\w(+-])(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?:[ ]?(?:x|ext\.?)[ ]?\d{1,6})?(?![\w-])",
    re.ASCII)
_DIGIT = re.compile(r"\d", re.ASCII)


def luhn_ok(digits: str) -> bool:
    """True when the digit string passes the Luhn (mod 10) checksum used by payment cards."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _is_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    hex_groups = [g for g in s.split(":") if g and "." not in g]
    return len(hex_groups) >= 3 or "." in s


def _is_card(s: str) -> bool:
    digits = s.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


_EXTENSION = re.compile(r"[ ]?(?:x|ext\.?)[ ]?\d{1,6}$", re.ASCII)


def _is_phone(s: str) -> bool:
    n = sum(c.isdigit() for c in _EXTENSION.sub("", s))  # the extension's digits are not the number's
    return 7 <= n <= 15 if s.startswith("+") else n == 10 or (n == 11 and s.startswith("1"))


# kind -> (pattern, validator of a match or None, cheap test that the text may hold one at all)
_CHECKS: dict[str, tuple[re.Pattern[str], Callable[[str], bool] | None, Callable[[str], bool]]] = {
    "email": (_EMAIL, None, lambda t: "@" in t),
    "ipv6": (_IPV6, _is_ipv6, lambda t: ":" in t),
    "ipv4": (_IPV4, None, lambda t: "." in t and _DIGIT.search(t) is not None),
    "card": (_CARD, _is_card, lambda t: _DIGIT.search(t) is not None),
    "phone": (_PHONE, _is_phone, lambda t: _DIGIT.search(t) is not None),
}


class PIIRedactor:
    """Replaces PII by placeholders and keeps running counts per kind (see the module docstring)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {k: 0 for k in KINDS}

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """`text` with every match replaced; also returns this text's counts per kind."""
        found = {k: 0 for k in KINDS}
        for kind in KINDS:
            pattern, check, maybe = _CHECKS[kind]
            if not maybe(text):
                continue
            placeholder = PLACEHOLDERS[kind]

            def sub(m: re.Match[str], kind: str = kind, check=check, placeholder=placeholder) -> str:
                if check is not None and not check(m.group(0)):
                    return m.group(0)
                found[kind] += 1
                return placeholder

            text = pattern.sub(sub, text)
        for k, n in found.items():
            self.counts[k] += n
        return text, found
