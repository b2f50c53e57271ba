"""Configuration: one YAML file plus `--set key.path=value` overrides, checked against typed dataclasses.

Defaults live in the dataclasses below; configs/default.yaml shows every key with its default (a test
keeps the two equal). Unknown keys and bad values are refused with the key's full path.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


# Keys that moved: old key path -> new one. An old key is refused with its new place (a config written
# for an earlier capfilt must not have its setting silently dropped or misread). One line per move.
MOVED = {
    "dedup.eval_sets": "decontaminate.sets",
    "dedup.eval_threshold": "decontaminate.threshold",
    "dedup.eval_candidates": "decontaminate.candidates",
    "dedup.eval_verify": "decontaminate.verify",
    "dedup.eval_pixel_tolerance": "decontaminate.pixel_tolerance",
}


def _opt(default, help: str = "", **checks):
    """A config field with its help text and checks (min, max, choices)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **checks}, **factory)


@dataclass
class SparkSettings:
    master: str = _opt("local[*]", "Spark master when not launched by spark-submit (spark-submit's --master wins)")
    app_name: str = _opt("capfilt", "Spark application name")
    driver_memory: str = _opt("4g", "driver memory in local mode (JVM heap)")
    arrow_batch_size: int = _opt(512, "rows per Arrow batch sent to Python workers; bounds worker memory "
                                      "with image bytes (spark.sql.execution.arrow.maxRecordsPerBatch)", min=1)
    shuffle_partitions: int = _opt(0, "spark.sql.shuffle.partitions; 0 = 4 per core in local mode, Spark's "
                                    "default (200) on a cluster", min=0)
    log_level: Literal["ERROR", "WARN", "INFO", "DEBUG"] = _opt("WARN", "driver log level")
    conf: dict[str, str] = _opt(dict, "any other Spark settings, passed as they are")


@dataclass
class OutputSettings:
    overwrite: bool = _opt(False, "recompute a stage whose output is already committed")
    compression: Literal["zstd", "snappy", "gzip", "none"] = _opt("zstd", "Parquet compression codec")
    target_file_mb: int = _opt(256, "approximate size of one curated Parquet file (capfilt curate)", min=1)


@dataclass
class DownloadSettings:
    # Image hygiene (img2dataset's resizer options, plus a header check before any decode).
    image_size: int = _opt(256, "side of the stored image in pixels (img2dataset image_size)", min=8)
    resize_mode: Literal["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"] = _opt(
        "border", "img2dataset resize mode: border pads to a square, center_crop crops, no keeps the original")
    resize_only_if_bigger: bool = _opt(False, "never upscale small images")
    encode_format: Literal["jpg", "png", "webp"] = _opt("jpg", "format of the stored image")
    encode_quality: int = _opt(95, "JPEG/WebP quality (0-100) or PNG compression (0-9)", min=0, max=100)
    min_image_size: int = _opt(32, "smallest accepted side in pixels of the original (too_small below)", min=0)
    max_image_pixels: int = _opt(50_000_000, "largest accepted width*height, checked on the header before "
                                             "decoding: no decompression bomb reaches memory (too_large above)", min=1)
    max_aspect_ratio: float = _opt(10.0, "largest accepted long side / short side (too_large above)", min=1)
    reduced_decode: bool = _opt(True, "decode a plain JPEG at 1/2, 1/4 or 1/8 scale (libjpeg, in the DCT domain) "
                                      "when that still leaves 1.5x image_size, then resize: 2-3x faster "
                                      "than a full decode at web sizes (docs/download.md)")
    max_bytes: int = _opt(32 * 1024 * 1024, "largest accepted response body in bytes", min=1)
    # Fetching.
    processes: int = _opt(0, "parallel download tasks; 0 = Spark's default parallelism", min=0)
    threads: int = _opt(32, "download threads per task (img2dataset thread_count)", min=1)
    timeout: float = _opt(10.0, "seconds per request", min=0.1)
    retries: int = _opt(0, "retries of a request that failed with a retryable code (timeout, reset, refused, "
                           "dns, 408, 429, 5xx) within the run, with exponential backoff and jitter; "
                           "403/404/410, opt-outs and blocked addresses are never retried", min=0)
    retry_backoff_s: float = _opt(1.0, "first backoff before a retry, doubled each time (jittered, at most 60 s)",
                                  min=0)
    max_retry_after_s: float = _opt(120.0, "longest Retry-After (429/503) a download waits for; a host asking "
                                           "for more fails its rows with code retry_after (for --retry-failed)",
                                    min=0)
    max_retry_after_answers: int = _opt(3, "Retry-After answers (429/503) in a row from one host, each after the "
                                           "last wait had passed, after which a task gives up on the host: its "
                                           "remaining rows fail at once with code retry_after (for "
                                           "--retry-failed); 0 = never", min=0)
    max_retry_after_total_s: float = _opt(300.0, "seconds of Retry-After waits one host may ask of a task over the "
                                                 "run; past it the host's remaining rows fail with code "
                                                 "retry_after (for --retry-failed); 0 = no budget", min=0)
    # Politeness (docs/download.md: why these defaults).
    max_requests_per_second_per_host: float = _opt(10.0, "requests per second to one host across the whole "
                                                         "job; 0 = unlimited", min=0)
    max_connections_per_host: int = _opt(6, "concurrent requests to one host across the whole job (6: what "
                                            "browsers open per host); 0 = unlimited", min=0)
    robots_txt: bool = _opt(True, "fetch each host's robots.txt once per run (RFC 9309) and skip disallowed "
                                  "images (opted_out, code robots_txt)")
    tdm_reservation: bool = _opt(True, "a TDMRep 'tdm-reservation: 1' response header opts the image out "
                                       "(opted_out, code tdm_reservation)")
    polite_to_allowed_hosts: bool = _opt(False, "apply the per-host limits and robots.txt to allow-listed "
                                                "endpoints too (they are yours: exempt by default)")
    max_shard_retry: int = _opt(1, "reruns of a shard whose task failed as a whole", min=0)
    rows_per_shard: int = _opt(10_000, "input rows per img2dataset shard (unit of resume)", min=1)
    subjob_size: int = _opt(1000, "shards per Spark job of the img2dataset distributor", min=1)
    user_agent_token: str = _opt("capfilt", "token in the User-Agent and for scoped X-Robots-Tag directives")
    opt_out_directives: list[str] = _opt(lambda: ["noai", "noimageai", "noindex", "noimageindex"],
                                         "X-Robots-Tag directives that opt an image out (empty list: ignore)")
    # Safety.
    allow_hosts: list[str] = _opt(list, "HOST or HOST:PORT endpoints allowed although private or loopback "
                                        "(e.g. a local test server); everything else non-public is blocked")
    loopback_only: bool = _opt(False, "refuse every connection outside 127.0.0.0/8 and ::1 at the socket "
                                      "level (tests, air-gapped runs)")
    ca_bundle: str = _opt("", "PEM file of the certificate authorities HTTPS servers are checked against instead of "
                              "the system's (SSL_CERT_FILE works too); a path every executor can read")
    retry_tls: bool = _opt(False, "count TLS failures (code tls: an untrusted certificate, one for another name, a "
                                  "failed handshake) as retryable, in the run and for --retry-failed")
    # Input rules.
    drop_empty_captions: bool = _opt(True, "reject rows whose caption is empty or blank (empty_caption); "
                                           "false keeps them for the captioner")
    extract_exif: bool = _opt(False, "keep EXIF as a JSON column (img2dataset extract_exif)")


@dataclass
class ModelRuntime:
    """Where a model stage runs: shared by caption and filter."""
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto: CUDA in half precision when present")
    torch_threads: int = _opt(0, "torch threads per Python worker; 0 = torch's default", min=0)
    gpus_per_task: float = _opt(0.0, "GPUs per task on a cluster (stage-level scheduling via mapInPandas); "
                                     "0 = plain UDF", min=0)
    rows_per_part: int = _opt(50_000, "input rows per resumable part: a killed run redoes at most the parts "
                                      "not finished", min=1)


@dataclass
class CaptionSettings(ModelRuntime):
    model: str = _opt("coca_ViT-L-14:mscoco_finetuned_laion2b_s13b_b90k",
                      "captioner: open_clip name:tag, hf-hub: id, BLIP hub id, or a local checkpoint path")
    num_captions: int = _opt(5, "synthetic captions per image (BLIP-2 sampled 10); 0 = no captioner: the "
                                  "filter scores web captions only (LAION/DataComp-style filtering)", min=0)
    top_p: float = _opt(0.9, "nucleus sampling mass (BLIP's CapFilt used 0.9)", min=0.01, max=1)
    temperature: float = _opt(1.0, "sampling temperature", min=0.01)
    max_new_tokens: int = _opt(30, "longest synthetic caption in tokens", min=1)
    min_new_tokens: int = _opt(0, "shortest synthetic caption in tokens (BLIP's CapFilt: 5)", min=0)
    repetition_penalty: float = _opt(1.0, "> 1 makes words already in a caption less likely (CTRL's "
                                          "rule; 1 = off)", min=0.01)
    batch_size: int = _opt(32, "images per model call", min=1)
    fuse_filter: bool = _opt(True, "curate: run the filter's CLIP in the captioner's pass, on the same decoded "
                                   "image in the same task; false: two passes (each decodes every image)")


@dataclass
class FilterSettings(ModelRuntime):
    model: str = _opt("ViT-B-32:laion2b_s34b_b79k", "CLIP: open_clip name:tag, hf-hub: id, or a local path")
    rule: Literal["threshold", "topk", "percentile"] = _opt(
        "threshold", "threshold: keep captions scoring >= threshold (LAION: 0.28 with ViT-B/32); "
                     "topk: keep each image's top_k captions, web and synthetic ranked together (BLIP-2: "
                     "top 2 of 10); percentile: keep captions above the global percentile of web-caption "
                     "scores, computed on the cluster (DataComp: top 30%)")
    threshold: float = _opt(0.28, "cosine threshold (rule threshold; floor for topk)", min=-1, max=1)
    top_k: int = _opt(2, "captions kept per image (rule topk)", min=1)
    percentile: float = _opt(0.7, "quantile of web-caption scores below which captions drop (rule "
                                  "percentile; 0.7 keeps the top 30%)", min=0, max=1)
    batch_size: int = _opt(64, "images per model call", min=1)
    # BLIP's CapFilt filtered with an image-text matching head (docs/filters.md#itm).
    scorer: Literal["clip", "itm", "two_step"] = _opt(
        "clip", "clip: the rule works on the CLIP cosine; itm: on BLIP's image-text matching probability "
                "(every candidate, CLIP still embeds the image); two_step: CLIP scores every candidate, the "
                "ITM rescores those at or above clip_floor and the rule works on the ITM score")
    itm_model: str = _opt("Salesforce/blip-itm-large-coco",
                          "ITM model (scorer itm, two_step): a BLIP BlipForImageTextRetrieval hub id or local folder")
    itm_threshold: float = _opt(0.5, "match probability threshold (rules threshold and the topk floor, scorer itm "
                                     "and two_step)", min=0, max=1)
    clip_floor: float = _opt(0.2, "two_step: candidates whose CLIP cosine is below this are dropped without an "
                                  "ITM score", min=-1, max=1)
    clip_top: int = _opt(0, "two_step: only each image's clip_top best CLIP candidates (at or above clip_floor) "
                            "go to the ITM; 0 = all of them. LAION-COCO: 40 sampled captions, CLIP's top 5, "
                            "the second model chooses one (caption.num_captions=40, filter.clip_top=5, "
                            "filter.rule=topk, filter.top_k=1)", min=0)
    itm_batch_size: int = _opt(256, "captions per ITM call", min=1)


@dataclass
class DecontaminateSettings:
    """Evaluation-set decontamination (the decontaminate stage, after filter; docs/filters.md)."""
    sets: list[str] = _opt(list, "evaluation image sets whose copies leave the data (eval_contaminated): "
                                 "a folder of images, Parquet with image bytes, or a folder of WebDataset "
                                 "tars; empty = no decontamination")
    threshold: float = _opt(0.5, "image-embedding cosine at or above which an evaluation image is a "
                                 "candidate original of a row (exact copies are caught by hash first)",
                            min=-1, max=1)
    candidates: int = _opt(10, "nearest evaluation images per row checked as its candidate originals", min=1)
    verify: Literal["pixels", "none"] = _opt(
        "pixels", "pixels: confirm a candidate when the original's centre, scaled as a crop would scale it, "
                  "lies in the row's image nearly unchanged (a CLIP puts two pictures of one subject as close "
                  "as a copy); none: the embedding decides")
    pixel_tolerance: float = _opt(6.0, "largest RMS difference (0-255, on 64-px thumbnails, blurred) "
                                       "of a confirmed copy", min=0, max=255)


@dataclass
class DedupSettings:
    exact: bool = _opt(True, "drop rows whose image bytes (sha256) equal another's: the cheapest, surest evidence")
    # Captions: MinHash-LSH, signatures identical to datasketch.MinHash.
    captions: bool = _opt(True, "find near-duplicate web captions with MinHash-LSH")
    shingle: Literal["word", "char"] = _opt("word", "caption shingles: word n-grams, or character n-grams "
                                                    "for short alt-texts")
    ngram: int = _opt(3, "shingle size; a caption shorter than this is one shingle, never skipped", min=1)
    num_perm: int = _opt(128, "MinHash permutations (datasketch's default)", min=8)
    caption_threshold: float = _opt(0.7, "Jaccard threshold: LSH bands and rows are datasketch's optimal "
                                         "parameters for it", min=0.01, max=1)
    caption_image_threshold: float = _opt(
        0.9, "near-duplicate captions drop a row only when the images' cosine is at least this: two "
             "different images under one template caption are not duplicates", min=-1, max=1)
    max_per_caption_cluster: int = _opt(0, "keep at most this many rows per near-duplicate caption cluster, "
                                           "whatever the images (0 = no cap)", min=0)
    # Images: the filter's image embeddings, faiss.
    images: bool = _opt(True, "find near-duplicate images from the filter's image embeddings with faiss")
    image_threshold: float = _opt(0.95, "cosine at or above which two images are near-duplicate candidates",
                                  min=-1, max=1)
    image_verify: Literal["pixels", "none"] = _opt(
        "pixels", "pixels: confirm each candidate pair on 32x32 thumbnails (embeddings alone can call two "
                  "different pictures of one subject duplicates); none: the embedding decides")
    pixel_tolerance: int = _opt(32, "thumbnail cells differing by more than this (0-255, any channel) count "
                                    "as changed", min=0, max=255)
    pixel_max_changed: float = _opt(0.01, "largest share of changed thumbnail cells for a confirmed duplicate",
                                    min=0, max=1)
    exact_search_rows: int = _opt(100_000, "up to this many rows, search all pairs in one faiss index; above, "
                                           "SemDeDup-style k-means partitions", min=1)
    driver_max_rows: int = _opt(100_000, "up to this many rows (and exact_search_rows), the evidence is gathered "
                                         "on the driver from one collect, not in Spark jobs (0: always in Spark)",
                                min=0)
    partition_rows: int = _opt(50_000, "target rows per k-means partition at scale", min=100)
    kmeans_sample: int = _opt(100_000, "rows sampled to train the k-means centroids", min=100)
    # The survivor of each group.
    inherit_captions: bool = _opt(True, "the survivor inherits the kept captions of the rows it replaces, "
                                        "as candidates with source 'inherited_web' / 'inherited_synthetic'")


@dataclass
class PrefilterSettings:
    """Rules on the metadata and the caption, applied before download: a dropped row is never fetched."""
    max_punsafe: float | None = _opt(None, "drop rows whose punsafe (LAION's NSFW probability) is above this; "
                                           "null = off", min=0, max=1)
    max_pwatermark: float | None = _opt(None, "drop rows whose pwatermark (LAION's watermark probability) is "
                                              "above this; null = off", min=0, max=1)
    min_similarity: float | None = _opt(None, "drop rows whose similarity (LAION's CLIP cosine of the pair) is "
                                              "below this; null = off", min=-1, max=1)
    min_width: int = _opt(0, "drop rows whose original width (metadata) is below this; 0 = off", min=0)
    min_height: int = _opt(0, "drop rows whose original height (metadata) is below this; 0 = off", min=0)
    max_aspect_ratio: float | None = _opt(None, "drop rows whose original long side / short side (metadata) is "
                                                "above this; null = off", min=1)
    min_caption_chars: int = _opt(0, "drop captions shorter than this many characters; 0 = off", min=0)
    max_caption_chars: int = _opt(0, "drop captions longer than this many characters; 0 = off", min=0)
    min_caption_words: int = _opt(0, "drop captions of fewer words; 0 = off", min=0)
    max_caption_words: int = _opt(0, "drop captions of more words; 0 = off", min=0)
    languages: list[str] = _opt(list, "keep only captions in these languages (ISO 639-1 codes, e.g. [en]); "
                                      "empty = off")
    min_language_score: float = _opt(0.5, "a caption leaves for its language only when the detector is at "
                                          "least this confident", min=0, max=1)
    blocklist: list[str] = _opt(list, "words or phrases (case-insensitive, whole words) whose captions leave")
    blocklist_patterns: list[str] = _opt(list, "regular expressions (case-insensitive; RE2 syntax: no backreferences "
                                               "or lookaround) whose captions leave")
    columns: dict[str, str] = _opt(lambda: {"punsafe": "punsafe", "pwatermark": "pwatermark",
                                            "similarity": "similarity", "width": "WIDTH", "height": "HEIGHT"},
                                   "the input column of each metadata rule (LAION's names by default)")


@dataclass
class HeadsSettings:
    """Small models over the stored CLIP image embedding (the heads stage, after filter; docs/models.md)."""
    drop: list[str] = _opt(list, "heads (folders with head.safetensors + card.json) whose verdict drops a row: "
                                 "the reason is the head's name")
    flag: list[str] = _opt(list, "heads whose score is only recorded (column head_scores), dropping nothing")
    thresholds: dict[str, float] = _opt(dict, "head name -> threshold, replacing the one on its card")


@dataclass
class TargetSettings:
    """DataComp's image-based filter (the target stage, after filter); off unless `sets` names images (docs/filters.md)."""
    sets: list[str] = _opt(list, "images of the target task (folders of images, Parquet or WebDataset, as "
                                 "decontaminate.sets): rows whose image lies in a pool cluster none of them is "
                                 "nearest to leave (off_target); empty = off")
    clusters: int = _opt(100_000, "k-means clusters of the stored image embeddings (DataComp: 100,000); at most "
                                  "one per 10 sampled rows", min=1)
    sample: int = _opt(200_000, "rows (chosen by a hash of seed and uid) the centroids are trained on; their "
                                "embeddings are gathered on the driver (200,000 x 768-d: ~600 MB)", min=1)
    iterations: int = _opt(20, "k-means iterations", min=1)
    nearest: int = _opt(1, "clusters each target image keeps: its nearest centroids (DataComp: 1)", min=1)


@dataclass
class BalanceSettings:
    """Concept balancing (MetaCLIP), the last stage of the chain; off unless `entries` names a file (docs/filters.md)."""
    entries: str = _opt("", "metadata entries to balance over: a text file (one entry per line) or Parquet; "
                            "empty = no balancing")
    entries_column: str = _opt("entry", "the column holding the entries when `entries` is Parquet")
    t: int = _opt(20_000, "rows kept per entry in expectation: an entry matched by count > t rows keeps each "
                          "with probability t/count (MetaCLIP: 20k at 400M pairs, 170k at 2.5B)", min=1)
    captions: Literal["kept", "primary", "web"] = _opt(
        "kept", "the caption(s) matched: every kept candidate (web or synthetic), the primary caption, or the "
                "web alt-text alone (MetaCLIP's choice)")
    unmatched: Literal["drop", "keep"] = _opt("drop", "rows whose caption(s) match no entry: drop (no_entry, as "
                                                      "MetaCLIP's pool leaves them out) or keep")
    mode: Literal["drop", "loader"] = _opt(
        "drop", "drop: each row stays or leaves by its seeded draw; loader: every matched row stays with its keep "
                "probability and the training loader draws a fresh balanced subset each epoch (MetaCLIP 2's "
                "online curation; capfilt.udfs.balance.keep_in_epoch)")


@dataclass
class Config:
    seed: int = _opt(0, "seed for every random choice (sampling is seeded per row from it)", min=0)
    spark: SparkSettings = _opt(SparkSettings)
    download: DownloadSettings = _opt(DownloadSettings)
    caption: CaptionSettings = _opt(CaptionSettings)
    filter: FilterSettings = _opt(FilterSettings)
    decontaminate: DecontaminateSettings = _opt(DecontaminateSettings)
    dedup: DedupSettings = _opt(DedupSettings)
    prefilter: PrefilterSettings = _opt(PrefilterSettings)
    heads: HeadsSettings = _opt(HeadsSettings)
    target: TargetSettings = _opt(TargetSettings)
    balance: BalanceSettings = _opt(BalanceSettings)
    output: OutputSettings = _opt(OutputSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `key.path=value` overrides (values parsed as YAML)."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder, not a YAML file") from None
        except OSError as e:  # permission denied, a name too long, ...
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.path=value")
        node = data
        parts = key.strip().split(".")
        if parts[:2] == ["spark", "conf"] and len(parts) > 3:  # Spark's own keys have dots
            parts = [*parts[:2], ".".join(parts[2:])]
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or left empty in the file (`spark:` alone)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or e
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
    config = build(config_class(), data, "")
    if config.caption.min_new_tokens > config.caption.max_new_tokens:
        raise ConfigError(f"caption.min_new_tokens ({config.caption.min_new_tokens}) is above "
                          f"caption.max_new_tokens ({config.caption.max_new_tokens})")
    return config


def config_class() -> type:
    """Config, with a section for each stage from another package that brings settings (its name)."""
    from capfilt.pipelines.registry import settings_sections
    own = {f.name for f in dataclasses.fields(Config)}
    extra = [(name, cls, field(default_factory=cls, metadata={"help": f"settings of the {name} stage"}))
             for name, cls in settings_sections().items() if name not in own]
    return dataclasses.make_dataclass("Config", extra, bases=(Config,)) if extra else Config


def build(cls, data: Any, path: str):
    """Build dataclass `cls` from `data`, refusing unknown keys and ill-typed values by key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            if _join(path, key) in MOVED:
                raise ConfigError(f"config key '{_join(path, key)}' moved to '{MOVED[_join(path, key)]}'")
            near = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{_join(path, near[0])}'?)" if near else f" (known: {', '.join(known)})"
            raise ConfigError(f"unknown config key '{_join(path, key)}'{hint}")
    values = {}
    for name, f in known.items():
        if name in data:
            values[name] = _coerce(hints[name], data[name], _join(path, name), f.metadata)
    return cls(**values)


def _coerce(tp, value, path: str, meta) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, meta)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]", {}) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, _join(path, str(k)), {}) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp in (int, float):
        ok = isinstance(value, int) if tp is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise ConfigError(f"{path}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
        try:
            value = tp(value)
        except OverflowError:  # an integer too large for a float
            raise ConfigError(f"{path}: the number is too large") from None
        if not math.isfinite(value):  # YAML reads .nan and .inf; NaN would pass every min/max check
            raise ConfigError(f"{path}: expected a finite number, got {value}")
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"{path}: {value} is below the minimum {meta['min']}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(f"{path}: {value} is above the maximum {meta['max']}")
        return value
    if tp is str:
        if isinstance(value, bool):
            return str(value).lower()  # e.g. spark conf values written as true/false: Spark's spelling
        if isinstance(value, (int, float)):
            return str(value)  # e.g. spark conf values written as numbers
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {path} has an unsupported type {tp}")


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def describe(cls=None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key path, default, help) for every leaf: used by `capfilt config` and the docs test."""
    cls = cls or config_class()
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), key)
        else:
            rows.append((key, value, f.metadata.get("help", "")))
    return rows
