"""Credentials out of everything shown or stored: MLflow params, ``config.yaml`` files and
artifacts, log lines and the summary.

A URL's ``user:password@`` becomes ``***@`` and the value of a query parameter whose name looks
secret (``token``, ``sig``, ``X-Amz-Signature``, ``password``, ``api_key``, ...) becomes
``***``. Only what is shown or stored is redacted: a run itself keeps using the real value.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# scheme://user:password@host: the password runs to the last '@' before the path (RFC 3986 keeps
# '/', '?' and '#' out of it), so 'p@ss' is masked whole.
_USERINFO = re.compile(rf"(?P<scheme>{_SCHEME})[^\s/?#@'\"]*:[^\s/?#'\"]*@")
# ?token=..., &X-Amz-Signature=..., &sig=... (names matched anywhere, case-insensitively)
_QUERY = re.compile(
    r"(?P<name>[?&;][^=&#\s'\"]*?"
    r"(?:token|sig|signature|secret|password|passwd|pwd|credential|key|auth)"
    r"[^=&#\s'\"]*=)(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with every URL password and secret query value replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY.sub(lambda m: m["name"] + MASK, text)


def has_password(text: str) -> bool:
    """Whether ``text`` holds a URL with ``user:password@``."""
    return _USERINFO.search(text) is not None


def secret_query_names(text: str) -> list[str]:
    """The names of query parameters in ``text`` whose values are secrets (never the values)."""
    return [m["name"][1:-1] for m in _QUERY.finditer(text)]


def has_credentials(text: str) -> bool:
    return has_password(text) or bool(secret_query_names(text))


def redact_values(value: Any) -> Any:
    """A copy of a JSON-like tree (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_values(child) for key, child in value.items()}
    if isinstance(value, list | tuple):
        return [redact_values(child) for child in value]
    return value


class RedactingFilter(logging.Filter):
    """A handler filter that redacts a record's message (arguments included) and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_logs(logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger)
    that has none yet."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
