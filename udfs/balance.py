"""Concept matching for balancing (MetaCLIP's substring matching), free of Spark.

MetaCLIP (facebookresearch/MetaCLIP, `metaclip/substr_matching.py`) pads a caption with spaces, wraps
each of , . ; : ? ! ` in spaces, turns tabs and line breaks into spaces, and says an entry matches
when `f" {entry} "` is a substring of that text: one `in` test per entry, for every caption
(`substring_matches`, kept here as the reference). capfilt lower-cases caption and entries first.

The same answer without a pass over the entries: a match of `" entry "` starts and ends at a space
of the padded text, so the entry is exactly the text between two of its spaces. `EntryIndex` keeps a
hash table of the entries and looks up each word of the text (what lies between two of its spaces,
empty ones included) and, where some longer entry starts with that word, the runs of words of the
lengths some entry has. Cost per caption: its words times the few lengths that can match, whatever the
number of entries; identical matches (tests/test_balance.py compares both on every caption).
"""
from __future__ import annotations

import time
from collections.abc import Iterable

PUNCTUATION = (",", ".", ";", ":", "?", "!", "`")
SPACED = ("\t", "\n", "\r")


def spacing(text: str) -> str:
    """MetaCLIP's spacing of a caption, after lower-casing it."""
    spaced = f" {text.lower()} "
    for p in PUNCTUATION:
        spaced = spaced.replace(p, f" {p} ")
    for c in SPACED:
        spaced = spaced.replace(c, " ")
    return spaced


def substring_matches(text: str, spaced_entries: list[str]) -> list[int]:
    """The reference: MetaCLIP's loop, one `in` per entry (`spaced_entries`: `f" {entry.lower()} "`)."""
    spaced = spacing(text)
    return [i for i, entry in enumerate(spaced_entries) if entry in spaced]


class EntryIndex:
    """The entries (already lower-cased, distinct) as a hash table of {entry: id}, the lengths in words
    that occur, and the first words of the entries longer than one word."""

    def __init__(self, entries: list[str]):
        started = time.perf_counter()
        self.entries = entries
        self.ids = {entry: i for i, entry in enumerate(entries)}
        words = [entry.count(" ") + 1 for entry in entries]
        self.lengths = sorted(set(words) - {1})
        self.starts = {entry.split(" ", 1)[0] for entry, n in zip(entries, words) if n > 1}
        self.build_seconds = time.perf_counter() - started

    def match(self, text: str) -> list[int]:
        """Ids of the entries that match `text`, ascending (what `substring_matches` returns)."""
        words = spacing(text).split(" ")[1:-1]  # each between two spaces of the padded text
        ids, lookup, starts, lengths = set(), self.ids, self.starts, self.lengths
        for k, word in enumerate(words):
            hit = lookup.get(word)
            if hit is not None:
                ids.add(hit)
            if word in starts:
                for n in lengths:
                    if k + n > len(words):
                        break
                    hit = lookup.get(" ".join(words[k:k + n]))
                    if hit is not None:
                        ids.add(hit)
        return sorted(ids)

    def size_bytes(self) -> int:
        """Memory of the index: its tables and the strings they hold (the entry list itself excluded)."""
        import sys
        return (sys.getsizeof(self.ids) + sys.getsizeof(self.starts)
                + sum(sys.getsizeof(e) for e in self.ids) + sum(sys.getsizeof(w) for w in self.starts))


def prepare_entries(raw: Iterable[str]) -> tuple[list[str], int]:
    """Lower-cased entries, surrounding whitespace removed, blank ones left out, each once (first
    occurrence's order): (entries, how many repeats were merged)."""
    seen, entries, repeats = set(), [], 0
    for entry in raw:
        entry = str(entry).strip().lower()
        if not entry:
            continue
        if entry in seen:
            repeats += 1
            continue
        seen.add(entry)
        entries.append(entry)
    return entries, repeats


def epoch_uniform(uid: str, epoch: int, seed: int = 0) -> float:
    """A draw in [0, 1) per (seed, epoch, uid): the same in every worker and on every rerun of an epoch."""
    import hashlib
    digest = hashlib.blake2b(f"{seed}:{epoch}:{uid}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / float(1 << 53)


def keep_in_epoch(sample, epoch: int, seed: int = 0) -> bool:
    """Balancing at the loader (`balance.mode: loader`, MetaCLIP 2's online curation): whether this epoch's
    subset holds the sample, drawn with its `balance_prob`. `sample`: a WebDataset sample of a capfilt export
    (its `json`, bytes or decoded) or that json as a dict. A sample without a keep probability always stays.

        dataset = wds.WebDataset(urls).select(lambda s: keep_in_epoch(s, epoch))   # docs/filters.md
    """
    import json
    meta = sample.get("json", sample) if isinstance(sample, dict) else sample
    if isinstance(meta, (bytes, str)):
        meta = json.loads(meta)
    prob = meta.get("balance_prob")
    return True if prob is None else epoch_uniform(str(meta["uid"]), epoch, seed) < prob


_INDEXES: dict = {}


def index_for(key, entries: list[str]) -> EntryIndex:
    """The index of these entries, built once per Python worker (key: what identifies the entries)."""
    if key not in _INDEXES:
        _INDEXES.clear()  # one entry set at a time: a worker reused by another run frees the old one
        _INDEXES[key] = EntryIndex(entries)
    return _INDEXES[key]
