"""Caller-controlled values made safe to put in a log line (SPEC section 11, "Log lines
are data").

escape(value) -> str: the value with every control character (C0, DEL, C1) and every
Unicode line or paragraph separator written as a backslash escape (``\\n``, ``\\x00``,
``\\u2028``) and a backslash doubled, so the escaped text is one line that reads back
unambiguously; at most ``limit`` characters are kept (the rest is counted, not written).
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
LIMIT = 512


def _escaped(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if unicodedata.category(char) in ("Zl", "Zp", "Cf", "Cc", "Cs") or code == 0x85:
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return char


def escape(value: object, limit: int = LIMIT) -> str:
    """``str(value)`` with control characters and line breaks escaped, cut to ``limit``."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable() and "\\" not in text and len(text) <= limit:
        return text  # the common case: nothing to do
    out = "".join(_escaped(char) for char in text[:limit])
    if len(text) > limit:
        out += f"...({len(text) - limit} more characters)"
    return out
