"""--redact-pii: each kind on positive and negative examples, placeholders, counts and Luhn.

Run: .venv/bin/python -m pytest -q tests/unit/test_pii.py

References: hand-written examples whose expected redaction is written out in full; the Luhn
checksum against published test card numbers (Visa 4111 1111 1111 1111, Amex 378282246310005).
"""

from __future__ import annotations

import pytest

from clusterlm.data.pii import KINDS, PLACEHOLDERS, PIIRedactor, luhn_ok

POSITIVE = [
    # (text, expected redaction, kind)
    ("mail bob.smith+x@example.co.uk now.", "mail <EMAIL> now.", "email"),
    ("write to a_b-c@mail-server.example.org", "write to <EMAIL>", "email"),
    ("<alice@example.com>", "<<EMAIL>>", "email"),
    ("call +1 (415) 555-0100 today", "call <PHONE> today", "phone"),
    ("tel +44 20 7946 0958.", "tel <PHONE>.", "phone"),
    ("office 415-555-0100 or (415) 555 0100", "office <PHONE> or <PHONE>", "phone"),
    ("dial 415.555.0100", "dial <PHONE>", "phone"),
    ("call 1-415-555-0100 now", "call <PHONE> now", "phone"),  # the US "1-" prefix (was missed whole)
    ("desk 415-555-0100x123, 415-555-0100 ext. 7", "desk <PHONE>, <PHONE>", "phone"),  # extensions
    ("jöhn.doe@example.com wrote", "<EMAIL> wrote", "email"),  # non-ASCII local part: whole, not "jö<EMAIL>"
    ("host 192.168.0.1, gateway 10.0.0.254.", "host <IPV4>, gateway <IPV4>.", "ipv4"),
    ("from 255.255.255.255", "from <IPV4>", "ipv4"),
    ("v6 2001:db8:85a3::8a2e:370:7334 up", "v6 <IPV6> up", "ipv6"),
    ("full 2001:0db8:0000:0000:0000:ff00:0042:8329.", "full <IPV6>.", "ipv6"),
    ("mapped ::ffff:10.1.2.3 here", "mapped <IPV6> here", "ipv6"),
    ("visa 4111 1111 1111 1111 ok", "visa <CARD> ok", "card"),
    ("visa 4111-1111-1111-1111", "visa <CARD>", "card"),
    ("amex 378282246310005", "amex <CARD>", "card"),
]

NEGATIVE = [
    "user@localhost",  # no TLD
    "a@b.c",  # one-letter TLD
    "the ratio was 3:2 at 12:34:56",  # times, ratios
    "std::vector<int> and a::b",  # C++ scopes are valid-looking IPv6 but have < 3 groups
    "loopback ::1 and fe80::1",  # < 3 hex groups: not personal
    "version v1.2.3.4.5 and 10.0.0.256 and 1.2.3",  # too many parts, octet > 255, too few parts
    "years 1999-2005, date 2024-01-15, order 1234567890",  # not phone-shaped
    "part 2-415-555-0100 and v1.2.3-415-555-0100",  # a prefix other than "1" is not a phone's
    "4111 1111 1111 1112",  # fails Luhn
    "1234567890123456789012",  # 22 digits: longer than any card
    "GET /index.html HTTP/1.1",
    "To be, or not to be: that is the question.",
]


@pytest.mark.parametrize("text,expected,kind", POSITIVE)
def test_positive_examples_are_redacted(text: str, expected: str, kind: str) -> None:
    """Each positive example becomes the hand-written redaction, counted once under its kind."""
    r = PIIRedactor()
    out, found = r.redact(text)
    assert out == expected
    assert found == {k: int(k == kind) * expected.count(PLACEHOLDERS[kind]) for k in KINDS}
    assert r.counts == found


@pytest.mark.parametrize("text", NEGATIVE)
def test_negative_examples_are_unchanged(text: str) -> None:
    """Near misses (see the comments) are left exactly as they were, with zero counts."""
    r = PIIRedactor()
    out, found = r.redact(text)
    assert out == text
    assert sum(found.values()) == 0


def test_counts_accumulate_over_documents() -> None:
    """Running counts are the sums of the per-document counts (2 e-mails, 1 IPv4, 1 card, 1 phone)."""
    r = PIIRedactor()
    r.redact("a@example.com and b@example.com")
    r.redact("10.1.1.1 paid with 4111111111111111, call +49 30 1234567")
    assert r.counts == {"email": 2, "ipv6": 0, "ipv4": 1, "card": 1, "phone": 1}


def test_luhn_reference_numbers() -> None:
    """Luhn accepts the published test numbers and rejects each with its last digit changed."""
    for number in ("4111111111111111", "378282246310005", "5555555555554444", "79927398713"):
        assert luhn_ok(number)
        assert not luhn_ok(number[:-1] + str((int(number[-1]) + 1) % 10))


def test_long_text_linear() -> None:
    """A 2 MB document of digits, dots and colons is redacted (no catastrophic backtracking):
    1000 IPv4 addresses among filler are all found."""
    text = ("1.2.3 a:b 12345 " * 8 + "8.8.8.8 ") * 1000
    out, found = PIIRedactor().redact(text * 16)
    assert found["ipv4"] == 16000
    assert "8.8.8.8" not in out
