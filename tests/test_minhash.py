"""MinHash-LSH on captions: signatures, LSH parameters, buckets and clusters equal datasketch's."""
import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH
from datasketch.lsh import _optimal_param

from capfilt.pipelines.caption_dedup import (caption_buckets, caption_clusters, caption_signatures, candidate_pairs,
                                     lsh_bands)
from capfilt.pipelines.config import DedupSettings
from capfilt.udfs import minhash
from capfilt.udfs.minhash import band_keys, lsh_params, minhash_signatures, normalise_caption, shingles

TEXTS = [
    "A photo of a red circle on a blue background",
    "a   PHOTO of a red circle\ton a blue background ",  # same after normalisation
    "Straße ﬁsh café naïve Ⅻ",  # casefold ß, NFKC ligature and roman numeral
    "😀 emoji 👨‍👩‍👧 family 🇫🇷 flag",
    "日本語のキャプション テスト",
    "",
    "   \n\t ",
    "word",
    "two words",
    "x" * 10_000,
    " ".join(f"w{i % 97}" for i in range(2_000)),
    "lone surrogate \udcff inside",
]


def datasketch_minhash(shingle_list, num_perm=128, seed=1, scheme=None):
    m = MinHash(num_perm=num_perm, seed=seed, scheme=scheme)
    m.update_batch([s.encode("utf-8", "surrogatepass") for s in shingle_list])
    return m


def test_normalise_caption_folds_case_compatibility_forms_and_whitespace():
    assert normalise_caption("  Straße\u00a0ﬁ\u2003Ⅻ\n\tCAFÉ  ") == "strasse fi xii café"
    assert normalise_caption(None) == ""
    assert normalise_caption(" \t\n") == ""


def test_shingles_short_text_is_one_shingle_and_empty_text_none():
    assert shingles("Two  Words", "word", 3) == ["two words"]
    assert shingles("a b c d", "word", 3) == ["a b c", "b c d"]
    assert shingles("a b a b a b", "word", 2) == ["a b", "b a"]  # distinct, first appearance
    assert shingles("ab", "char", 5) == ["ab"]
    assert shingles("abcd", "char", 3) == ["abc", "bcd"]
    family = "👨\u200d👩\u200d👧"  # char shingles are code points, not grapheme clusters
    assert shingles(family, "char", 2) == ["👨\u200d", "\u200d👩", "👩\u200d", "\u200d👧"]
    for empty in ("", "  \n", None):
        assert shingles(empty, "word", 3) == [] and shingles(empty, "char", 5) == []
    with pytest.raises(ValueError, match="'word' or 'char'"):
        shingles("", "token", 3)


@pytest.mark.parametrize("scheme", ["affine32", "affine64", "legacy"])
def test_signatures_are_bit_identical_to_datasketch(scheme, monkeypatch):
    monkeypatch.setattr(minhash, "_CHUNK_SHINGLES", 5_000)  # rows also split across chunks
    for kind, n in [("word", 1), ("word", 3), ("char", 4)]:
        lists = [shingles(t, kind, n) for t in TEXTS]
        for num_perm, seed in [(128, 1), (64, 0), (9, 12345)]:
            sig, has = minhash_signatures(lists, num_perm, seed, scheme)
            for row, shingle_list in enumerate(lists):
                expected = datasketch_minhash(shingle_list, num_perm, seed, scheme).hashvalues
                assert sig.dtype == expected.dtype
                assert np.array_equal(sig[row], expected), (scheme, kind, n, num_perm, seed, TEXTS[row][:30])
                assert has[row] == bool(shingle_list)
    assert minhash_signatures([], 16)[0].shape == (0, 16)


def test_lsh_params_equal_datasketch_optimal_parameters_over_a_grid():
    for num_perm in (8, 16, 50, 128):
        for threshold in (0.05, 0.3, 0.5, 0.7, 0.85, 0.95):
            for weights in ((0.5, 0.5), (0.3, 0.7)):
                assert lsh_params(threshold, num_perm, weights) == _optimal_param(threshold, num_perm, *weights)


def test_band_keys_are_the_bucket_keys_of_minhashlsh():
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    bands, rows = lsh_params(0.7, 128)
    assert (bands, rows) == (lsh.b, lsh.r)
    lists = [shingles(t, "word", 3) for t in TEXTS if t.strip()]
    keys = band_keys(minhash_signatures(lists)[0], bands, rows)
    for row, shingle_list in enumerate(lists):
        hashvalues = datasketch_minhash(shingle_list).hashvalues
        assert [keys[row, band].tobytes() for band in range(bands)] == [
            lsh._H(hashvalues[start:end]) for start, end in lsh.hashranges]


def planted_corpus(n_base=140, seed=5):
    """(uid, caption) rows: varied templates and free text, near-duplicates planted by edits (word
    swaps, insertions, deletions, case and spacing), exact copies, short alt-texts, empty captions."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("red", "blue", "big", "old", "new", "tiny", "dark", "soft")
             for b in ("cat", "dog", "car", "tree", "lamp", "boat", "house", "chair", "shoe", "cup")]
    templates = [
        "a photo of a {0} next to a {1} in the {2}",
        "{0} {1} {2} for sale, free shipping, best price on {3}",
        "stock image: {0} and {1} isolated on white background {2}",
        "wallpaper {0} {1} hd 1920x1080 {2} download",
        "{0}",
        "{0} {1}",
    ]
    base = []
    for _ in range(n_base):
        if rng.random() < 0.4:
            base.append(" ".join(rng.choices(vocab, k=rng.randint(3, 30))))
        else:
            template = rng.choice(templates)
            base.append(template.format(*rng.choices(vocab, k=4)))

    def edit(caption):
        words = caption.split()
        if rng.random() < 0.3:  # formatting only: the same caption once normalised
            return caption.upper() if rng.random() < 0.5 else "  " + caption.replace(" ", " \t ", 1)
        for _ in range(rng.choice((1, 1, 2))):
            op, i = rng.random(), rng.randrange(len(words))
            if op < 0.4:
                words[i] = rng.choice(vocab)
            elif op < 0.7:
                words.insert(i, rng.choice(vocab))
            elif len(words) > 1:
                del words[i]
        return " ".join(words)

    captions = list(base)
    for caption in rng.sample(base, 70):
        captions += [edit(caption) for _ in range(rng.randint(1, 3))]
    captions += rng.sample(base, 20)  # exact copies
    captions += ["", "   ", None, None, "logo", "LOGO", "image", "😀", "😀 😀"]
    uids = [f"u{rng.randrange(16 ** 6):06x}" for _ in captions]
    assert len(set(uids)) == len(uids)
    rng.shuffle(captions)
    return list(zip(uids, captions))


def datasketch_pairs_and_dropped(rows, settings):
    """(pairs, dropped) from datasketch: MinHashLSH query pairs and, from a union-find over them,
    every row but the smallest uid of its component."""
    lsh = MinHashLSH(threshold=settings.caption_threshold, num_perm=settings.num_perm)
    sketches = {}
    for uid, caption in rows:
        shingle_list = shingles(caption, settings.shingle, settings.ngram)
        if shingle_list:
            sketches[uid] = datasketch_minhash(shingle_list, settings.num_perm)
            lsh.insert(uid, sketches[uid])
    pairs = {(min(u, v), max(u, v)) for u, m in sketches.items() for v in lsh.query(m) if v != u}
    parent = {u: u for u in sketches}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in sorted(pairs):
        ru, rv = find(u), find(v)
        parent[max(ru, rv)] = min(ru, rv)
    dropped = {u for u in sketches if find(u) != u}
    return pairs, dropped


@pytest.mark.slow
@pytest.mark.parametrize("shingle,ngram,threshold,num_perm", [("word", 3, 0.7, 128), ("char", 5, 0.5, 64)])
def test_candidate_pairs_and_dropped_rows_equal_datasketch_lsh_with_union_find(spark, shingle, ngram, threshold,
                                                                             num_perm):
    settings = DedupSettings(shingle=shingle, ngram=ngram, caption_threshold=threshold, num_perm=num_perm)
    rows = planted_corpus()
    expected_pairs, expected_dropped = datasketch_pairs_and_dropped(rows, settings)
    assert len(expected_pairs) > 100 and len(expected_dropped) > 80  # the corpus does plant duplicates
    df = spark.createDataFrame(rows, "uid string, caption string").repartition(3)
    pairs = {(r.uid_a, r.uid_b) for r in candidate_pairs(df, settings).collect()}
    assert pairs == expected_pairs
    clusters = caption_clusters(df, settings).collect()
    assert {r.uid for r in clusters if r.uid != r.cluster} == expected_dropped
    assert {r.uid for r in clusters} == {u for pair in expected_pairs for u in pair}  # only rows with a duplicate


def test_spark_signatures_and_buckets_equal_datasketch_and_captions_without_shingles_get_none(spark):
    settings = DedupSettings(num_perm=32, caption_threshold=0.5)
    rows = [(f"t{i:02d}", text) for i, text in enumerate(TEXTS[:-1])] + [("none", None)]
    df = spark.createDataFrame(rows, "uid string, caption string")
    got = {r.uid: r.signature for r in caption_signatures(df, settings).collect()}
    buckets: dict[str, set] = {}
    for r in caption_buckets(df, settings).collect():
        buckets.setdefault(r.uid, set()).add(bytes(r.bucket))
    lsh = MinHashLSH(threshold=0.5, num_perm=32)
    for uid, text in rows:
        shingle_list = shingles(text, "word", 3)
        if shingle_list:
            hashvalues = datasketch_minhash(shingle_list, 32).hashvalues
            assert got[uid] == hashvalues.tolist()
            assert buckets[uid] == {lsh._H(hashvalues[start:end]) + band.to_bytes(2, "big")
                                    for band, (start, end) in enumerate(lsh.hashranges)}
        else:
            assert got[uid] is None and uid not in buckets


@pytest.mark.slow
def test_a_template_caption_shared_by_many_rows_is_one_cluster_of_star_edges(spark):
    from capfilt.pipelines.caption_dedup import caption_edges
    settings = DedupSettings()
    rows = [(f"r{i:05d}", "Click here to enlarge the image") for i in range(3_000)] + [("z", "something else entirely")]
    df = spark.createDataFrame(rows, "uid string, caption string")
    assert lsh_bands(settings) == (14, 9)
    edges = caption_edges(df, settings)
    assert edges.count() == 2_999  # one edge per member, not 4.5 million pairs
    clusters = caption_clusters(df, settings)
    assert clusters.select("cluster").distinct().collect()[0].cluster == "r00000"
    assert clusters.count() == 3_000
