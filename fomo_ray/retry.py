"""Transient failures (a network fetch that timed out, a server that answered 503) are retried with exponential
back-off; deterministic ones (a missing file, a 404, a bad config) are raised at once. A fetch still failing after
its attempts raises :class:`TransientError`, which is not a ``ValueError``: a sweep's trial then fails its attempt
and Ray Tune retries it (``ray.max_failures``), instead of recording it as a deterministic failure that a retry or a
resume would only repeat (``tune_sweep.DETERMINISTIC``)."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

#: seconds before attempt 2, 3, ...: doubling from BASE_S, at most MAX_S each
ATTEMPTS, BASE_S, MAX_S = 4, 2.0, 60.0
#: HTTP statuses worth another try: rate limits and server-side trouble
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class TransientError(ConnectionError):
    """A fetch that kept failing for reasons that may pass (network, server); the message names what was fetched."""


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None) or getattr(exc, "status_code", None) or getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def is_transient(exc: BaseException) -> bool:
    """Network and server trouble: connection and timeout errors, HTTP 408/425/429/5xx (requests and
    huggingface_hub errors carry the response), other ``OSError``s that are not about a local file, and a
    ``RuntimeError`` raised from one of those."""
    status = _status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError):
        return True
    # a library's own wrapper of the network error (open_clip raises RuntimeError("Failed to download weights ...")
    # while handling it)
    inner = exc.__cause__ or exc.__context__
    return isinstance(exc, RuntimeError) and inner is not None and is_transient(inner)


def delays(attempts: int = ATTEMPTS, base_s: float = BASE_S, max_s: float = MAX_S) -> list[float]:
    """The waits between ``attempts`` tries: ``base_s``, 2 ``base_s``, 4 ``base_s``, ... each at most ``max_s``."""
    return [min(max_s, base_s * 2 ** i) for i in range(max(0, attempts - 1))]


def with_backoff(fetch: Callable[[], T], what: str, *, attempts: int = ATTEMPTS, base_s: float = BASE_S,
                 sleep: Callable[[float], None] | None = None, log: Callable[[str], None] | None = None) -> T:
    """``fetch()``, tried again after each transient failure (:func:`is_transient`, :func:`delays`); a
    deterministic error is raised at once, unchanged. After the last attempt: :class:`TransientError` naming
    ``what``, the attempts and the last error."""
    waits = delays(attempts, base_s)
    for i in range(len(waits) + 1):
        try:
            return fetch()
        except Exception as e:  # noqa: BLE001 - classified below; deterministic errors propagate unchanged
            if not is_transient(e):
                raise
            if i == len(waits):
                raise TransientError(f"{what}: still failing after {attempts} attempts "
                                     f"({type(e).__name__}: {e})") from e
            if log is not None:
                log(f"{what}: {type(e).__name__}: {e}; retrying in {waits[i]:.0f} s (attempt {i + 2}/{attempts})")
            (sleep or time.sleep)(waits[i])
    raise AssertionError("unreachable")
