"""Hide passwords in URIs and pipelines before they reach a log, an event, the summary or the console.

`redact("rtsp://admin:hunter2@cam/stream?token=abc")` → `"rtsp://admin:***@cam/stream?token=***"`: the
user stays (it tells an operator which account a stream uses), every password becomes `***`. Works
on free text too (a GStreamer pipeline with `rtspsrc location=rtsp://u:p@h user-pw=p`, an error
message), and is idempotent. Plain stdlib: the runtime imports it on a Jetson without torch.
"""

from __future__ import annotations

import re

__all__ = ["MASK", "redact"]

MASK = "***"

# `scheme://` then the authority candidate, up to whitespace or a quote.
_URL = re.compile(r"""(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s"'<>]*)""")
# key=value pairs whose value is a secret: URL query strings (?password=…&token=…) and GStreamer
# properties (rtspsrc user-pw=…, proxy-pw=…). The value may be quoted.
_SECRET_KEYS = (r"password|passwd|pass|pwd|secret|token|access_token|auth_token|api_key|apikey|"
                r"client_secret|user-pw|proxy-pw|user_pw")
_KEY_VALUE = re.compile(rf"""(?P<key>(?<![A-Za-z0-9_\-])(?:{_SECRET_KEYS})\s*=\s*)"""
                        r"""(?P<value>"[^"]*"|'[^']*'|[^\s&;#"',]*)""", re.IGNORECASE)


def _redact_authority(m: re.Match) -> str:
    scheme, rest = m.group("scheme"), m.group("rest")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]  # RFC 3986: it ends at the first / ? #
    if "@" in authority:
        at = authority.rindex("@")  # the last one: passwords with an unescaped '@' exist
    elif re.fullmatch(r"(\[[^\]]*\]|[^:]*)(:\d*)?", authority):
        return m.group(0)  # a plain host[:port] (or [IPv6]:port): no credentials
    else:
        # IP cameras accept passwords with an unescaped '/', '?' or '#', which end the strict authority
        # early and would leave the rest of the password in the path: "user:<not a port>" then runs to
        # the last '@' (over-redacting a malformed URI is the safe mistake).
        if "@" not in rest:
            return m.group(0)
        at = rest.rindex("@")
    user, colon, password = rest[:at].partition(":")
    if not colon or not password:
        return m.group(0)
    return f"{scheme}{user}:{MASK}{rest[at:]}"


def redact(text: str) -> str:
    """`text` with every URI password and secret-named parameter value replaced by `***`."""
    if not text:
        return text
    text = _URL.sub(_redact_authority, str(text))
    return _KEY_VALUE.sub(lambda m: m.group("key") + (m.group("value") and MASK), text)
