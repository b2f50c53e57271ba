"""The stage records: what each stage reads and writes (docs/architecture.md shows the flow).

pairs -> downloaded -> captioned -> scored -> curated, and rejects from every stage.
Columns beyond a contract (LAION's extra metadata) ride along unless the contract says otherwise.
"""
from capfilt.schemas.contract import (BINARY, BOOL, FLOAT32, INT32, STRING, Contract, Field, list_of,
                              struct_of)

PAIRS = Contract("pairs", (
    Field("uid", STRING, False, "stable row id: the input's id column, else derived from url+caption+position"),
    Field("url", STRING, True, "image URL as given (may be malformed: the download stage decides)"),
    Field("caption", STRING, True, "web caption (alt-text), untrusted"),
), "an input image-text pair after column mapping")

DOWNLOADED = PAIRS.extend("downloaded", (
    Field("image", BINARY, False, "encoded image bytes as resized by the download stage"),
    Field("width", INT32, False, "width of `image`"),
    Field("height", INT32, False, "height of `image`"),
    Field("original_width", INT32, True, "width before resizing"),
    Field("original_height", INT32, True, "height before resizing"),
    Field("sha256", STRING, False, "hex sha256 of the image bytes as fetched (before resizing)"),
), "a pair whose image was fetched, decoded and re-encoded")

CAPTIONED = DOWNLOADED.extend("captioned", (
    Field("synthetic_captions", list_of(STRING), False, "K captions sampled from the captioner"),
), "a downloaded pair with synthetic captions")

CANDIDATE = struct_of(
    Field("text", STRING, False, "caption text"),
    Field("source", STRING, False, "'web' or 'synthetic'"),
    Field("score", FLOAT32, True, "the score the selection rule used: clip_score, or itm_score when the "
                                  "filter's scorer is itm or two_step"),
    Field("kept", BOOL, False, "whether the selection rule kept this caption"),
    Field("clip_score", FLOAT32, True, "cosine similarity of the CLIP image and text embeddings"),
    Field("itm_score", FLOAT32, True, "ITM match probability (null: the ITM did not score it)"),
)

SCORED = CAPTIONED.extend("scored", (
    Field("candidates", list_of(CANDIDATE), False, "web + synthetic captions with scores"),
    Field("best_score", FLOAT32, True, "highest candidate score"),
    Field("image_embedding", BINARY, False, "L2-normalised image embedding, float16 little-endian"),
), "a captioned pair with CLIP scores and the selection made")

CURATED = SCORED.extend("curated", (
    Field("caption_primary", STRING, False, "the caption to train on: best kept candidate"),
), "a pair that survived every stage", drop=("synthetic_captions",))

REJECTS = Contract("rejects", (
    Field("uid", STRING, False),
    Field("url", STRING, True),
    Field("caption", STRING, True, "the web caption"),
    Field("stage", STRING, False, "stage that dropped the row"),
    Field("reason", STRING, False, "machine-readable reason (see REASONS)"),
    Field("detail", STRING, True, "human-readable detail: HTTP status, error, best score..."),
    Field("duplicate_of", STRING, True, "uid of the survivor, for duplicates"),
), "a row that left the pipeline, and why", extra_columns=False)

CONTRACTS = {c.name: c for c in (PAIRS, DOWNLOADED, CAPTIONED, SCORED, CURATED, REJECTS)}
