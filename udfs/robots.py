"""robots.txt for the download stage (RFC 9309), fetched once per host per run inside a Spark task.

The file is fetched through the worker's guarded opener (udfs/fetch.py: the same address policy, opt-out
headers, size cap, deadline and per-host budget as images) and parsed with Protego, which implements
RFC 9309's matching (longest match wins, Allow beats Disallow on a tie, `*` and `$` wildcards) where the
standard library's urllib.robotparser takes the first matching rule and knows no wildcards.

What a fetch means for the host's rows (RFC 9309 section 2.3.1):
    2xx        the rules, from the first 500 KiB
    3xx        followed through the opener (up to 10 hops; the RFC asks for at least 5)
    4xx        no rules: everything allowed (429 excepted: Google and Bing treat it as 5xx, as capfilt does)
    5xx, 429, timeout, reset, refused, DNS failure
               unreachable: every row of the host is disallowed for this run (code robots_txt), so
               --retry-failed does not fetch them; a new run asks again
    a blocked address, an opt-out header on the file itself
               no verdict: each image request meets the same check
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from capfilt.udfs.polite import failure_code

MAX_BYTES = 500 * 1024  # RFC 9309 2.5: parse at least the first 500 KiB
USER_AGENT = ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0 "
              "(compatible; {token}; +https://github.com/rom1504/img2dataset)")  # what img2dataset sends


@dataclass(frozen=True)
class Robots:
    """One host's verdict: rules (Protego) or allow everything or disallow everything, and why."""
    authority: str
    rules: object | None = None
    disallow_all: str | None = None     # why, when the file was unreachable

    named: tuple[str, ...] = ()        # the tokens after the first that have a group of their own

    def refusal(self, url: str, tokens: tuple[str, ...]) -> str | None:
        """Why `url` may not be fetched (a reject detail), or None. The first token is capfilt's own
        (its group, else `*`); the others (img2dataset) count only where a group names them."""
        if self.disallow_all:
            return f"robots_txt: {self.authority}/robots.txt {self.disallow_all}: the host is disallowed for this run"
        if self.rules is not None:
            for token in tokens[:1] + tuple(t for t in tokens[1:] if t in self.named):
                if not self.rules.can_fetch(url, token):
                    return f"robots_txt: disallowed for {token} by {self.authority}/robots.txt"
        return None


def glob_match(pattern: str, path: str) -> bool:
    """RFC 9309 matching of one rule: `*` any characters, a final `$` the end of the path, otherwise a
    prefix. Each literal piece is found leftmost after the one before (which leaves the most room for
    the rest): O(len(path) x pieces). Protego compiles `*` to a lazy regex, which backtracks
    exponentially: a hostile rule such as Disallow: /*a*a*a...*b held one URL for over a minute."""
    anchored = pattern.endswith("$")
    pieces = (pattern[:-1] if anchored else pattern).split("*")
    if not path.startswith(pieces[0]):
        return False
    pos = len(pieces[0])
    if len(pieces) == 1:
        return not anchored or pos == len(path)
    for piece in pieces[1:-1]:
        found = path.find(piece, pos)
        if found < 0:
            return False
        pos = found + len(piece)
    last = pieces[-1]
    return path.endswith(last) and len(path) - len(last) >= pos if anchored else path.find(last, pos) >= 0


def _parse(text: str):
    import protego
    protego._URLPattern.match = lambda self, path: glob_match(self._pattern, path)  # see glob_match
    return protego.Protego.parse(text)


def fetch(authority: str, token: str, timeout: float) -> Robots:
    """GET authority/robots.txt through the installed opener (udfs/fetch.py: prepare_worker first)."""
    request = urllib.request.Request(f"{authority}/robots.txt", headers={"User-Agent": USER_AGENT.format(token=token)})
    opener = urllib.request._opener  # the guarded opener; its plain open(): one attempt, no retry
    try:
        with urllib.request.OpenerDirector.open(opener, request, timeout=timeout) as response:
            body = response.read(MAX_BYTES)
    except urllib.error.HTTPError as e:
        e.close()
        if 400 <= e.code < 500 and e.code != 429:
            return Robots(authority)
        return Robots(authority, disallow_all=f"answered {e.code}")
    except Exception as e:
        code = failure_code(e)
        if code in ("blocked_address", "x_robots_tag", "tdm_reservation"):
            return Robots(authority)  # each image request meets the same check
        return Robots(authority, disallow_all=f"was unreachable ({code}: {str(e)[:200]})")
    text = body.decode("utf-8", "replace")
    named = tuple(t.lower() for t in re.findall(r"(?im)^\s*user-agent\s*:\s*([^\s#]+)", text))
    return Robots(authority, rules=_parse(text), named=named)


class RobotsCache:
    """The verdicts a task has fetched, by authority (scheme://host:port); new ones fetched in parallel."""

    def __init__(self, token: str, tokens: tuple[str, ...], timeout: float, threads: int):
        self.token, self.tokens, self.timeout, self.threads = token, tokens, timeout, threads
        self.known: dict[str, Robots] = {}

    def refusals(self, authorities, urls) -> list[str | None]:
        new = sorted(set(authorities) - self.known.keys())
        if new:
            with ThreadPoolExecutor(min(self.threads, len(new))) as pool:
                for robots in pool.map(lambda a: fetch(a, self.token, self.timeout), new):
                    self.known[robots.authority] = robots
        return [self.known[a].refusal(u, self.tokens) for a, u in zip(authorities, urls)]
