"""robots.txt for the download stage (RFC 9309), fetched once per host per run inside a Spark task.

The file is fetched through the worker's guarded opener (net/fetch.py: the same address policy,
deadline and per-host budget as images; not the opt-out headers or the image size cap, which are about
images) and parsed with Protego, which implements RFC 9309's matching (longest match wins, Allow beats
Disallow on a tie, `*` and `$` wildcards) where the standard library's urllib.robotparser takes the
first matching rule and knows no wildcards.

What a fetch means for the host's rows (RFC 9309 section 2.3.1):
    2xx        the rules, from the first 500 KiB (a line cut at 500 KiB is dropped), whatever the
               response's X-Robots-Tag or tdm-reservation headers (they are about the file, not the site);
               gzip/deflate bodies decompressed (capfilt asks for no encoding; some servers compress anyway),
               any other Content-Encoding: unreachable (rules that cannot be read are not "no rules")
    3xx        followed through the opener (up to 10 hops; the RFC asks for at least 5)
    4xx        no rules: everything allowed (429 excepted: Google and Bing treat it as 5xx, as capfilt does)
    5xx, 429, timeout, reset, refused, DNS failure, too many redirects
               unreachable: every row of the host is disallowed for this run (failed_to_download, code
               robots_txt_unreachable). The RFC's complete disallow holds for the run; the rows are
               retryable, and --retry-failed asks robots.txt again before it fetches any of them
    a redirect to a blocked address or scheme
               the rules exist but capfilt may not read them: every row disallowed (opted_out, robots_txt)
    the host's own address blocked
               no verdict: each image request meets the same address check

Text (RFC 9309 2.2: UTF-8): see `robots_text`. Decoding never loses a rule: a byte-order mark (UTF-8,
UTF-16, UTF-32) is honoured and removed, UTF-16 without one is recognised, a line that is not UTF-8 is
read in the declared charset (else Latin-1) and, for a Disallow, also as its raw bytes.

Matching: Protego's verdict (`_can_fetch`), each rule matched in linear time (`glob_match`) and only the
rules whose literal start is a prefix of the path tried (Protego tries all of them for every URL).
"""
from __future__ import annotations

import codecs
import re
import zlib
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote

import protego

from capfilt.net.polite import failure_code

MAX_BYTES = 500 * 1024  # RFC 9309 2.5: parse at least the first 500 KiB
USER_AGENT = ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0 "
              "(compatible; {token}; +https://github.com/rom1504/img2dataset)")  # what img2dataset sends


@dataclass(frozen=True)
class Robots:
    """One host's verdict: rules (Protego) or allow everything or disallow everything, and why."""
    authority: str
    rules: object | None = None
    disallow_all: str | None = None     # why every row is disallowed for good (the rules cannot be read)
    unreachable: str | None = None      # why every row is disallowed for this run (retryable)

    named: tuple[str, ...] = ()        # the tokens after the first that have a group of their own

    def refusal(self, url: str, tokens: tuple[str, ...]) -> str | None:
        """Why `url` may not be fetched (a reject detail, code first), or None. The first token is
        capfilt's own (its group, else `*`); the others (img2dataset) count only where a group names them."""
        if self.unreachable:
            return (f"robots_txt_unreachable: {self.authority}/robots.txt {self.unreachable}: the host is "
                    f"disallowed for this run (RFC 9309); --retry-failed asks again")
        if self.disallow_all:
            return f"robots_txt: {self.authority}/robots.txt {self.disallow_all}: the host is disallowed"
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


def _can_fetch(rule_set, url: str) -> bool:
    """Protego's _RuleSet.can_fetch (the first match in its order: longest pattern first, Allow before
    Disallow on a tie, i.e. the verdict of the greatest (length, is Allow) among matching rules), looking
    only at the rules whose literal start is a prefix of the path. Protego tries every rule for every URL:
    a 500 KiB robots.txt of 30,000 rules took 11 ms per URL, over 15 minutes for a host of 100,000 rows."""
    path = rule_set._quote_path(url)
    index = rule_set.__dict__.get("_capfilt_index")
    if index is None:
        index = {}
        for rule in rule_set._rules:
            pattern = rule.value._pattern
            literal = pattern.split("*", 1)[0].removesuffix("$") if "*" in pattern or pattern.endswith("$") \
                else pattern
            index.setdefault(literal, []).append((rule.value.priority, rule.field == "allow", pattern))
        rule_set._capfilt_index = index = (sorted({len(k) for k in index}), index)
    lengths, rules = index
    best = None
    for n in lengths:
        if n > len(path):
            break
        for key in rules.get(path[:n], ()):
            if (best is None or key[:2] > best) and glob_match(key[2], path):
                best = key[:2]
    return best is None or best[1]


protego._URLPattern.match = lambda self, path: glob_match(self._pattern, path)  # see glob_match
protego._RuleSet.can_fetch = _can_fetch

_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_WIDE = re.compile(r"utf-?(16|32)", re.I)
_EOL = re.compile(rb"\r\n|\r|\n")  # RFC 9309 2.2: EOL = CR / LF / CR LF
# What str.splitlines (Protego's line splitter) also breaks at, and RFC 9309 does not: whitespace around
# a field, and inside a value percent-encoded as a URL would carry it (a path with U+2028 stays one rule).
_NOT_EOL = re.compile("[\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_DISALLOW = re.compile(r"\s*disallow\s*:", re.I)
_FIELD = re.compile(r"\s*([^\s:#]+)\s*:(.*)", re.S)
_INVISIBLE = "\ufeff\u200b\u2060"  # BOM / zero-width characters: before a field they only hide it


def _line(line: str) -> str:
    """One line as Protego reads it best: `field: value`, the comment cut, whitespace (any kind) around
    the field, the colon and the value dropped."""
    line = line.lstrip(_INVISIBLE)
    m = _FIELD.match(line)
    if not m:
        return _NOT_EOL.sub(" ", line)
    value = m.group(2).split("#", 1)[0].strip()
    return f"{m.group(1)}: {_NOT_EOL.sub(lambda c: quote(c.group()), value)}"


def _ascii_compatible(charset: str | None) -> str | None:
    """`charset` when Python knows it and it writes ASCII as ASCII (so lines can be cut in bytes)."""
    try:
        return charset if charset and "\n:/*# Disallow".encode(charset) == b"\n:/*# Disallow" else None
    except (LookupError, UnicodeError, TypeError, ValueError):
        return None


def _wide(body: bytes, charset: str | None) -> str | None:
    """The codec of a body in UTF-16/32: from a byte-order mark, the declared charset, or (no BOM, no
    charset) the NUL bytes of ASCII text written in UTF-16. None: an ASCII-compatible encoding."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            return codec
    if charset and _WIDE.search(charset) and b"\x00" in body[:4096]:  # ASCII in UTF-16/32 has NUL bytes
        try:
            codecs.lookup(charset)
            return charset
        except LookupError:
            pass
    head = body[:4096]
    if head.count(0) * 4 >= len(head) > 0:
        even, odd = head[0::2].count(0), head[1::2].count(0)
        if odd > 3 * even:
            return "utf-16-le"
        if even > 3 * odd:
            return "utf-16-be"
    return None


def robots_text(body: bytes, charset: str | None = None) -> str:
    """The text of a robots.txt body for Protego: one rule per line, "\\n" between lines.

    RFC 9309 says UTF-8, and most files are; the others must not lose a rule. A byte-order mark is
    honoured and dropped (a UTF-8 BOM read as text hid the first line's field: `User-agent: *` became
    an unknown field and its group's `Disallow: /` was lost); UTF-16/32 come from a BOM, the declared
    charset, or the NUL bytes of UTF-16 text. Otherwise lines are cut at CR, LF and CRLF only, and each
    line is read as UTF-8; a line that is not UTF-8 is read in the declared charset (else Latin-1),
    and a Disallow line is also kept read as UTF-8 with U+FFFD, which matches the URL that carries its
    raw bytes percent-encoded (Protego reads invalid escapes the same way). A U+FEFF or zero-width
    space starting a line (files concatenated with their BOMs) is dropped, and whitespace that
    str.splitlines would break at (VT, FF, NEL, U+2028...) does not cut a rule in two (`_line`)."""
    wide = _wide(body, charset)
    if wide:
        text = body.decode(wide, "replace")
        lines = re.split(r"\r\n|\r|\n", text)
    else:
        declared = _ascii_compatible(charset)
        declared = None if declared and codecs.lookup(declared).name == "utf-8" else declared
        lines = []
        for raw in _EOL.split(body):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(raw.decode(declared or "latin-1", "replace"))
                if _DISALLOW.match(lines[-1]):
                    lines.append(raw.decode("utf-8", "replace"))
    return "\n".join(map(_line, lines))


def parse(body: bytes, charset: str | None = None):
    """Protego's rules from a robots.txt body, and the lower-cased user-agent tokens that have a group."""
    text = robots_text(body, charset)
    named = tuple(t.lower() for t in re.findall(r"(?im)^[ \t]*user-agent[ \t]*:[ \t]*([^\s#]+)", text))
    return protego.Protego.parse(text), named


def fetch(authority: str, token: str, timeout: float) -> Robots:
    """GET authority/robots.txt through the installed opener (net/fetch.py: prepare_worker first).
    Only the request counts against `timeout`: what it needs is imported when this module is."""
    request = urllib.request.Request(f"{authority}/robots.txt", headers={"User-Agent": USER_AGENT.format(token=token)})
    request.capfilt_robots = {"redirects": 0}  # net/fetch.py: no opt-out headers or size cap; counts hops
    opener = urllib.request._opener  # the guarded opener; its plain open(): one attempt, no retry
    try:
        with urllib.request.OpenerDirector.open(opener, request, timeout=timeout) as response:
            body = response.read(MAX_BYTES + 1)
            charset = response.headers.get_content_charset()
            encoding = (response.headers.get("Content-Encoding") or "").strip().lower()
    except urllib.error.HTTPError as e:
        e.close()
        if 400 <= e.code < 500 and e.code != 429:
            return Robots(authority)
        return Robots(authority, unreachable=f"answered {e.code}")
    except Exception as e:
        code = failure_code(e)
        if code == "blocked_address":
            if request.capfilt_robots["redirects"]:
                return Robots(authority, disallow_all=f"redirects where capfilt may not go ({str(e)[:200]})")
            return Robots(authority)  # the host itself is blocked: each image request meets the same check
        return Robots(authority, unreachable=f"was unreachable ({code}: {str(e)[:200]})")
    try:
        body = _content_decoded(body, encoding)
    except (ValueError, zlib.error) as e:  # rules we cannot read are not "no rules"
        return Robots(authority, unreachable=f"could not be decoded ({str(e)[:200]})")
    if len(body) > MAX_BYTES:  # the rest is not read: neither is the line it cuts
        body = body[:MAX_BYTES]
        ends = [m.end() for m in _EOL.finditer(body)]
        body = body[:ends[-1]] if ends else b""
    rules, named = parse(body, charset)
    return Robots(authority, rules=rules, named=named)


def _content_decoded(body: bytes, encoding: str) -> bytes:
    """The body under its Content-Encoding (capfilt asks for none; some servers compress anyway): gzip
    and deflate decompressed up to MAX_BYTES + 1, an encoding capfilt cannot read refused (ValueError).
    A gzip stream without the header is recognised by its magic bytes."""
    if encoding in ("", "identity", "none") and not body.startswith(b"\x1f\x8b"):
        return body
    if encoding in ("gzip", "x-gzip", "", "identity", "none"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == "deflate":  # zlib-wrapped as RFC 9110 says; raw deflate as some servers send
        wbits = zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS
    else:
        raise ValueError(f"Content-Encoding {encoding[:50]!r} is not one capfilt reads")
    return zlib.decompressobj(wbits).decompress(body, MAX_BYTES + 1)


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
