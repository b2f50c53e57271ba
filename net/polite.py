"""Politeness inside a download worker: per-host request rate and connection limits, Retry-After, and
the failure codes that decide what is retried.

A worker process holds one HostLimits for the job's policy. The job routes each host's rows to as few
shards as it can (pipelines/download.py: plan_shards) and tells the workers how many shards share a host:
each gets that share of the host's budget, so the limit holds however many tasks run at once.
"""
from __future__ import annotations

import datetime
import email.utils
import http.client
import random
import re
import socket
import ssl
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Codes are the first word of a download reject's detail ("http_404: HTTP Error 404: Not Found").
RETRYABLE_CODES = frozenset({"timeout", "reset", "refused", "dns", "retry_after", "shard_failed", "http_408",
                             "http_425", "http_429", "http_500", "http_502", "http_503", "http_504",
                             "robots_txt_unreachable"})
MAX_BACKOFF_S = 60.0
# RFC 9111 4.2.1: a delta-seconds value too large to represent counts as 2^31 seconds (68 years).
MAX_DELTA_SECONDS = 2 ** 31


def failure_code(error: BaseException) -> str:
    """The machine-readable code of a failed request."""
    if isinstance(error, urllib.error.HTTPError):
        return "redirect_loop" if "infinite loop" in str(error.msg) else f"http_{error.code}"
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    text = str(reason)
    own = re.match(r"([a-z][a-z0-9_]*): ", text)
    if own and own.group(1) in OWN_CODES:
        return own.group(1)
    if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in text:
        return "timeout"
    if isinstance(reason, ConnectionRefusedError) or "refused" in text.lower():
        return "refused"
    if isinstance(reason, socket.gaierror) or "cannot resolve" in text:
        return "dns"
    if isinstance(reason, (ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected)) \
            or "reset" in text.lower() or "EOF occurred" in text or "Remote end closed" in text:
        return "reset"
    if isinstance(reason, ssl.SSLError):
        return "tls"
    return "other"


# The words capfilt's own errors start with ("blocked_address: ..."): each is its code.
OWN_CODES = frozenset({"blocked_address", "response_too_large", "x_robots_tag", "tdm_reservation", "robots_txt",
                       "robots_txt_unreachable", "retry_after", "redirect_loop"})


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 10.2.3): delta-seconds (1*DIGIT, ASCII digits
    only: `str.isdigit` also takes '²' and '٣') or an HTTP-date; None when absent or anything else, so
    the answer is treated like one without the header. Never raises; a finite 0 <= s <= 2^31."""
    if not value:
        return None
    value = value.strip(" \t")  # OWS
    if re.fullmatch(r"[0-9]+", value):
        digits = value.lstrip("0")
        # int() of a very long string raises (Python's 4,300-digit limit): length says it is over the cap.
        return float(MAX_DELTA_SECONDS if len(digits) > 10 else min(int(digits or "0"), MAX_DELTA_SECONDS))
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # asctime and "-0000" forms: an HTTP-date is always GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    except Exception:  # TypeError, ValueError, IndexError, OverflowError: not a date
        return None
    return min(max(0.0, seconds), float(MAX_DELTA_SECONDS))


def backoff_s(attempt: int, base: float) -> float:
    """Exponential backoff with equal jitter: half of base * 2**attempt, plus up to the other half."""
    ceiling = min(MAX_BACKOFF_S, base * 2 ** attempt)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass
class _Host:
    interval: float              # seconds between request starts in this process; 0 = no rate limit
    connections: int             # concurrent requests in this process; 0 = unlimited
    lock: threading.Condition = field(default_factory=threading.Condition)
    next_start: float = 0.0
    not_before: float = 0.0      # Retry-After: no request before this (monotonic) time
    active: int = 0
    asked: int = 0               # Retry-After answers in a row, each to a request sent after the last wait
    waited: float = 0.0          # seconds of Retry-After this process was asked to wait, over the run
    given_up: str | None = None  # why the host's remaining requests fail at once (code retry_after)


class HostLimits:
    """Per-host budgets in one worker process. `rate` requests/s and `connections` per host for the
    whole job, divided by the number of shards that share the host (`shares`, default 1).

    Retry-After: one wait longer than `max_wait_s`, `max_answers` Retry-After answers in a row (each to
    a request sent after the previous wait had passed: the requests in flight when the first one came
    back are the same answer; a 2xx/3xx in between starts the count again) or more than `budget_s`
    seconds of waiting asked for in all, and the host's remaining requests in this process fail at
    once with code retry_after (retryable by --retry-failed) instead of stalling the shard. 0: no limit."""

    def __init__(self, rate: float, connections: int, shares: dict[str, int] | None = None,
                 max_wait_s: float = 300.0, max_answers: int = 0, budget_s: float = 0.0):
        self.rate = rate
        self.connections = connections
        self.shares = shares or {}
        self.max_wait_s = max_wait_s
        self.max_answers = max_answers
        self.budget_s = budget_s
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()

    def _host(self, host: str, exempt: bool = False) -> _Host:
        with self._lock:
            h = self._hosts.get((host, exempt))
            if h is None:
                share = max(1, self.shares.get(host, 1))
                # k shards spaced k / (rate + 1 - k) s apart: each lets at most (rate + 1) / k requests
                # into any one-second window, so together at most rate + 1 (k <= rate; else rate + k).
                interval = 0.0 if self.rate <= 0 or exempt else \
                    share / (self.rate + 1 - share) if share <= self.rate else share / self.rate
                # A host shared by more shards than it has connections still gets one per shard.
                connections = max(1, self.connections // share) if self.connections > 0 and not exempt else 0
                h = self._hosts[(host, exempt)] = _Host(interval, connections)
            return h

    def acquire(self, host: str, exempt: bool = False):
        """Wait for this host's Retry-After to pass, a free connection and its next turn (an exempt host:
        only for its Retry-After); returns the release function. Turns are spaced from the moment each
        request was let go, so a thread that wakes late never lets the next one through early."""
        h = self._host(host, exempt)
        with h.lock:
            while True:
                now = time.monotonic()
                if h.given_up:
                    raise urllib.error.URLError(f"retry_after: {h.given_up}")
                if h.not_before > now:
                    if h.not_before - now > self.max_wait_s:
                        raise urllib.error.URLError(
                            f"retry_after: {host} asked to wait {h.not_before - now:.0f} s more (Retry-After), "
                            f"over download.max_retry_after_s={self.max_wait_s:g}")
                    h.lock.wait(h.not_before - now)
                elif h.connections and h.active >= h.connections:
                    h.lock.wait()
                elif h.next_start > now:
                    h.lock.wait(h.next_start - now)
                else:
                    h.next_start = now + h.interval
                    h.active += 1
                    break
        released = False

        def release():
            nonlocal released
            with h.lock:
                if not released:
                    released = True
                    h.active -= 1
                    h.lock.notify_all()
        return release

    def hold_off(self, host: str, seconds: float, exempt: bool = False, sent: float | None = None) -> None:
        """The host said Retry-After to a request sent (let go by acquire) at monotonic time `sent`: no
        request to it from this process for `seconds`; past the limits, none for the rest of the run."""
        h = self._host(host, exempt)
        with h.lock:
            if sent is None or sent >= h.not_before:  # not one of the requests in flight with an earlier answer
                h.asked += 1
                h.waited += seconds
                if self.max_answers and h.asked >= self.max_answers:
                    h.given_up = (f"{host} answered Retry-After {h.asked} times in a row "
                                  f"(download.max_retry_after_answers={self.max_answers}): its remaining "
                                  f"rows in this task are left for --retry-failed")
                elif self.budget_s and h.waited > self.budget_s:
                    h.given_up = (f"{host} asked for {h.waited:.0f} s of Retry-After waits in all "
                                  f"(download.max_retry_after_total_s={self.budget_s:g}): its remaining "
                                  f"rows in this task are left for --retry-failed")
            h.not_before = max(h.not_before, time.monotonic() + seconds)
            h.lock.notify_all()

    def answered(self, host: str, exempt: bool = False, sent: float | None = None) -> None:
        """The host served a request sent at `sent` (2xx/3xx): Retry-After answers are no longer in a row."""
        h = self._host(host, exempt)
        with h.lock:
            if sent is None or sent >= h.not_before:
                h.asked = 0


def exempt_entries(allow_hosts) -> tuple[tuple[str, int | None], ...]:
    """download.allow_hosts as (host, port or None): the endpoints politeness leaves alone by default."""
    from capfilt.net.netguard import _split_host_port
    return tuple((host.lower(), port) for host, port in map(_split_host_port, allow_hosts))


def is_exempt(url: str, entries: tuple[tuple[str, int | None], ...]) -> bool:
    if not entries:
        return False
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    return any(host == h and p in (None, port) for h, p in entries)
