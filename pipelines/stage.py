"""A stage as one object, and the one runner that owns every stage's lifecycle.

A `Stage` declares its name, the contract of the rows it reads, the columns it adds, its reasons, an
optional model pass and its split (marked rows -> records, rejects). `run_stage` does the rest for
every stage alike: begin, fingerprint and resume, input validation, the model pass part by part,
write, counts, manifest, atomic commit.

Images are stored once. The download stage writes the image bytes; every later stage writes only
`uid`, `capfilt_part` and the columns it adds (`data/capfilt_part=<i>/`). A stage reads a *view*: the download rows
joined on uid with the columns each earlier stage added (inner: a row rejected earlier is gone; a
later stage's column replaces an earlier one of the same name). Parts are groups of download files
(about rows_per_part rows), fixed by the first stage after download and kept by every later one, so
the view of one part joins the download files of that part with small metadata (broadcast): image
bytes are read where they lie and never shuffled.

A model pass decodes each image once and runs one or more models on it (caption and filter fused
in `capfilt curate`); its output per part (`model/capfilt_part=<i>/`) is resumable, and a stage that keeps it
(filter: every candidate's score) re-selects from it without loading a model.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from capfilt.schemas import REJECTS, Contract, Field

from capfilt.pipelines.inference import PASS

PART = "capfilt_part"  # not "part": an input may have a column of that name, which rides along


@dataclass(frozen=True)
class ModelPass:
    """One model's work on decoded images inside a Python worker."""
    role: str                       # manifest key: "captioner", "clip"
    reads: tuple[str, ...]          # view columns the batch reads besides the image
    fields: Callable                # () -> [Spark StructField] it outputs into the pass struct
    batch: Callable                 # cfg -> picklable (frame, images) -> {field: values}
    settings: Callable              # cfg -> its ModelRuntime settings (device, gpus_per_task, rows_per_part)
    keys: tuple[str, ...]           # dotted config keys its output depends on: a change needs a new pass
    reference: Callable = lambda cfg: None   # cfg -> the model reference it loads (None: no model)
    more_models: Callable = lambda cfg: {}   # cfg -> {role: reference} of other models its batch loads
    feeds: dict = field(default_factory=dict)  # {output field: view column} for a pass fused after it


@dataclass(frozen=True)
class Result:
    """What a stage's split returns: the rows it keeps (with the columns it adds), the rows it drops
    (the rejects table's columns) and what it reports for the manifest's `models` entry (a cutoff,
    a cost, the rules that ran)."""
    records: object
    rejects: object
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Context:
    """What the runner gives a split besides the rows and the config (read only): the chain it reads,
    the rows that came in, a scratch folder removed after the write, and the download's images."""
    chain: "Chain | None"
    rows: int
    workdir: str
    images: Callable = None  # () -> DataFrame (uid, image) of the download: only for a stage with images=True


@dataclass(frozen=True)
class Section:
    """A part of `capfilt inspect` a stage adds (the download: its failure map), under `key` in the report:
    `compute(spark, root, top)` aggregates it with Spark from root (a curate OUT, or the stage's own
    output; `top`: rows of its longest tables), `text(figures, root)` gives terminal lines and
    `html(figures, root)` escaped HTML, shown under `title`."""
    key: str
    title: str
    compute: Callable
    text: Callable
    html: Callable


# Model-stage settings that change where and how fast a model runs, not what it computes.
RUNTIME_ONLY = frozenset({"torch_threads", "gpus_per_task", "batch_size", "fuse_filter"})


@dataclass(frozen=True)
class Stage:
    """One step of the chain, declared up front; the runner (`run_stage`) and everything else
    (`capfilt curate`'s plan, the CLI, the config's sections, the driver checks, staleness, the
    funnel) derive from these declarations. Its config section is the one named as it (a stage capfilt
    does not ship brings its own: `settings`); pipelines/registry.py says how a stage joins the chain."""
    name: str
    reads: Contract | None          # the view it reads (None: the first stage, which reads the input)
    adds: tuple[Field, ...] | None  # the columns it writes besides uid and part (None: whole records)
    reasons: dict | Callable        # {reason: meaning}, or cfg -> that where the config decides them
    split: Callable | None          # (rows, cfg, Context) -> Result (None: a stage with its own run)
    help: str = ""                  # one line: `capfilt <name>` (a stage with help has a command)
    command: str | None = None      # the module of its own job (None: jobs/stage.py's, --input a stage output)
    settings: type | None = None    # dataclass of its config section `<name>`, for a stage capfilt does not ship
    depends: tuple[str, ...] = ()   # other dotted config keys its output depends on (e.g. "seed")
    runtime: frozenset = RUNTIME_ONLY  # keys of its section that change how, not what, it computes
    model: ModelPass | None = None
    costly: tuple[str, ...] = ()    # keys whose change needs its expensive work redone (default: the model's)
    keeps_scores: bool = False      # its expensive work's output stays committed: other settings reuse it
    from_model: dict = field(default_factory=dict)  # {view column: pass field} read from that kept output
    images: bool = False            # its split reads image bytes (Context.images)
    models: Callable = lambda cfg: {}  # cfg -> the manifest's "models" entry
    enabled: Callable = lambda cfg: True  # cfg -> whether `capfilt curate` runs it (off: not in the chain)
    after: str | None = None        # a stage from outside capfilt: the stage it runs after
    fuse_next: Callable = lambda cfg: False  # cfg -> run the next stage's model pass in this one's
    filters: tuple = ()             # stages applied to its input before its expensive work (download: prefilter)
    # (cfg, input root or None in curate) -> raises one line when what the split reads besides the rows
    # (heads, evaluation sets, a model outside the pass) cannot be used; on the driver, before Spark
    check: Callable = lambda cfg, input_root: None
    # The first stage's own lifecycle (download: fetch into shards, resumable): (stage, cfg, input, out,
    # decision, options) -> manifest. None: the runner's (view, model pass per part, split, write).
    run: Callable | None = None
    source: Callable | None = None  # first stage: input -> what identifies it (files, sizes, times)
    # (output root, Decision, options) -> raises one line when what `run` would do with its committed
    # output is refused (download: a retry that changes settings, a re-filter of an older download);
    # called by the runner and by curate's plan, on the driver, before Spark
    preflight: Callable = lambda root, decision, options: None
    inspect: tuple = ()             # Sections it adds to `capfilt inspect` (download: the failure map)
    # cfg -> {config key: digest} of the files its split reads besides the rows (balance: the entries
    # file): kept in its manifest; another digest makes its output stale as another setting does
    inputs: Callable = lambda cfg: {}

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The dotted keys whose values a committed output was made with: a change makes it stale."""
        return (self.name, *(k for f in self.filters for k in f.config_keys), *self.depends)

    @property
    def expensive_keys(self) -> tuple[str, ...]:
        return self.model.keys if self.model else self.costly

    def reasons_for(self, cfg) -> dict[str, str]:
        return self.reasons(cfg) if callable(self.reasons) else dict(self.reasons)

    def check_inputs(self, cfg, input_root: str | None = None, model: bool = True) -> None:
        """Everything the stage will load, checked on the driver before Spark starts: the references of
        its model pass (unless `model` is false: stored scores are reused) and its own `check`."""
        from capfilt.udfs.models import check_reference
        if model and self.model:
            for role, ref in {self.model.role: self.model.reference(cfg), **self.model.more_models(cfg)}.items():
                if ref:
                    check_reference(ref, role)
        for f in self.filters:
            f.check(cfg, input_root)
        self.check(cfg, input_root)

    def schema(self):
        """Spark schema of what the stage writes."""
        from pyspark.sql import types as T
        return T.StructType([T.StructField("uid", T.StringType(), False),
                             *[T.StructField(f.name, f.type.spark(), f.nullable) for f in self.adds],
                             T.StructField(PART, T.IntegerType(), False)])


def reject_rows(df, stage: str, reason, detail, duplicate_of=None):
    """The rejects table's rows: uid, url, caption and why (Column or text for reason and detail)."""
    from pyspark.sql import Column
    from pyspark.sql import functions as F

    def col(value):
        return value if isinstance(value, Column) else F.lit(value)
    return df.select("uid", "url", "caption", F.lit(stage).alias("stage"), col(reason).cast("string").alias("reason"),
                     col(detail).cast("string").alias("detail"),
                     (F.lit(None) if duplicate_of is None else col(duplicate_of)).cast("string").alias("duplicate_of"))


# ---------------------------------------------------------------------------------------------------
# The chain a stage belongs to: where the images and every earlier stage's columns lie.

@dataclass
class Chain:
    """`roots`: [(stage, root)] from download on; `parts`: download data files per part and their
    rows; `scores`: {stage: folder of the model output it keeps} (columns a stage takes from there)."""
    roots: list
    parts: list
    scores: dict = field(default_factory=dict)

    @classmethod
    def of(cls, input_root: str, manifest: dict, rows_per_part: int) -> "Chain":
        """The chain read by a stage whose input is `input_root` (committed, with `manifest`)."""
        from capfilt.pipelines.registry import definition
        root = _absolute(input_root)
        if definition(manifest.get("stage")).reads is None:  # the first stage: it holds the images
            return cls([(manifest["stage"], root)], download_parts(f"{root}/data", rows_per_part))
        if "chain" not in manifest:
            raise ValueError(f"{input_root} was written by an older capfilt (no chain in its manifest): rerun its "
                             f"stages with this version")
        return cls([(name, resolve(root, where)) for name, where in manifest["chain"]], manifest["download_parts"],
                   {name: resolve(root, where) for name, where in manifest.get("scores", {}).items()})

    def to_manifest(self, stage: str, root: str, scores: str | None = None) -> dict:
        """Each folder relative to this stage's root: a copied or moved OUT still finds its parts."""
        root = _absolute(root)
        kept = {**self.scores, **({stage: _absolute(scores)} if scores else {})}
        return {"chain": [[name, relative(where, root)] for name, where in [*self.roots, (stage, root)]],
                "download_parts": self.parts, "scores": {name: relative(where, root) for name, where in kept.items()}}

    @property
    def images(self) -> str:
        return self.roots[0][1]

    def files(self, part: int) -> list[str]:
        return [f"{self.images}/data/{name}" for name in self.parts[part]["files"]]


def _absolute(root: str) -> str:
    import os
    root = str(root).rstrip("/")
    return root if "://" in root else os.path.abspath(root)


def relative(target: str, start: str) -> str:
    """target as a path relative to start when both lie on one file system (else target as it is)."""
    import posixpath
    (ts, tp), (ss, sp) = (x.split("://", 1) if "://" in x else ("", x) for x in (target, start))
    if ts != ss or (ts and tp.split("/", 1)[0] != sp.split("/", 1)[0]):
        return target
    return posixpath.relpath(tp, sp)


def resolve(start: str, where: str) -> str:
    """A path recorded by relative(), resolved against start."""
    import posixpath
    if "://" in where or where.startswith("/"):
        return where
    scheme, sep, path = start.partition("://") if "://" in start else ("", "", start)
    return f"{scheme}{sep}{posixpath.normpath(posixpath.join(path, where))}"


def download_parts(data_dir: str, rows_per_part: int) -> list[dict]:
    """The download's Parquet files in a fixed order, grouped to about rows_per_part rows each, with
    row counts from the file footers (no pass over the data)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, path = fsspec.core.url_to_fs(data_dir)
    parts, files, rows = [], [], 0
    for name in sorted(fs.glob(f"{path}/*.parquet")):
        with fs.open(name, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        files.append(name.rsplit("/", 1)[-1])
        rows += n
        if rows >= rows_per_part:
            parts.append({"files": files, "rows": rows})
            files, rows = [], 0
    if files or not parts:
        parts.append({"files": files, "rows": rows})
    return parts


def stage_data(spark, root: str, stage: Stage, part: int | None = None):
    """What a stage wrote (uid, its columns, part), optionally one part (read from that folder only)."""
    from pyspark.sql import functions as F
    df = spark.read.schema(stage.schema()).option("pathGlobFilter", "*.parquet").parquet(f"{root}/data")
    return df if part is None else df.filter(F.col(PART) == part)


def view(spark, chain: Chain, part: int | None = None, images: bool = False):
    """The rows a stage reads: download rows joined with every earlier stage's columns (a later
    stage's non-null value replaces an earlier one). One part (joined against that part's metadata,
    broadcast) or all; with or without the image bytes."""
    from pyspark.sql import functions as F
    if part is None:
        rows = spark.read.option("pathGlobFilter", "*.parquet").parquet(f"{chain.images}/data")
    elif chain.parts[part]["files"]:
        rows = spark.read.parquet(*chain.files(part)).withColumn(PART, F.lit(part))
    else:
        rows = spark.read.option("pathGlobFilter", "*.parquet").parquet(f"{chain.images}/data").limit(0) \
            .withColumn(PART, F.lit(part))
    if not images:
        rows = rows.drop("image")
    from capfilt.pipelines.registry import definition
    for name, root in chain.roots[1:]:
        stage = definition(name)
        added = stage_data(spark, root, stage, part)
        if stage.from_model and name in chain.scores:
            kept = spark.read.option("pathGlobFilter", "*.parquet").parquet(chain.scores[name])
            if part is not None:
                kept = kept.filter(F.col(PART) == part)
            added = added.join(kept.select("uid", *[F.col(f"{PASS}.{field}").alias(column)
                                                    for column, field in stage.from_model.items()]), "uid")
        if part is not None:
            added = F.broadcast(added.drop(PART))
        both = [c for c in added.columns if c != "uid" and c in rows.columns]
        added = added.select(*[F.col(c).alias(f"_new_{c}") if c in both else F.col(c) for c in added.columns])
        rows = rows.join(added, "uid")
        for c in both:
            rows = rows.withColumn(c, F.coalesce(F.col(f"_new_{c}"), F.col(c))).drop(f"_new_{c}")
    return rows


# ---------------------------------------------------------------------------------------------------
# The model pass: decode once, run each model, per part.

class PassBatch:
    """The batch function shipped to workers: decodes each image once, runs the passes in order (a
    later pass reads what an earlier one fed it), counts decodes in an accumulator."""

    def __init__(self, cfg, passes: list[ModelPass], decoded):
        self.runs = [(p.batch(cfg), p.feeds) for p in passes]
        self.names = ["error", *[f.name for p in passes for f in p.fields()]]
        self.decoded = decoded

    def __call__(self, frame):
        import pandas as pd

        from capfilt.udfs.images import decode_images
        images, errors = decode_images(frame["image"].tolist())
        self.decoded.add(len(images))
        out = {"error": errors}
        for run, feeds in self.runs:
            out.update(run(frame, images))
            for name, column in feeds.items():
                frame[column] = out[name]
        return pd.DataFrame({name: out[name] for name in self.names})


def pass_type(passes: list[ModelPass]):
    from pyspark.sql import types as T
    return T.StructType([T.StructField("error", T.StringType(), True), *[f for p in passes for f in p.fields()]])


def pass_columns(passes: list[ModelPass]) -> list[str]:
    fed = set()
    columns = ["image"]
    for p in passes:
        columns += [c for c in p.reads if c not in fed and c not in columns]
        fed |= set(p.feeds.values())
    return columns


def infer(df, cfg, passes: list[ModelPass], decoded):
    """df + the pass struct `_inference` (error and every pass's fields)."""
    from capfilt.pipelines.inference import apply_batches
    settings = passes[0].settings(cfg)
    return apply_batches(df, PassBatch(cfg, passes, decoded), pass_columns(passes), pass_type(passes),
                         settings.gpus_per_task)


def pass_keys(cfg, passes: list[ModelPass]) -> dict:
    """The values of the config keys the passes' output depends on."""
    data = cfg.to_dict()
    values = {}
    for p in passes:
        for key in p.keys:
            node = data
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            values[key] = node
    return values


# ---------------------------------------------------------------------------------------------------
# The runner.

def run_stage(stage: Stage, cfg, input, output_root: str, fuse: tuple = (), recompute: bool = False,
              options: dict | None = None) -> dict:
    """Run `stage` from `input` (the committed output of the stage before it; the first stage: what its
    `source` reads) into output_root; commit atomically. What happens to an output already committed
    there is `decide`'s (pipelines/provenance.py): reuse it, recompute what needs no model from what
    it kept, run, or refuse naming what differs. `recompute` (curate, when a stage before it ran): run
    as --overwrite does, still reusing a kept model output that matches. `fuse`: [(stage name, ModelPass)]
    to run in this stage's model pass (on the same decoded image), kept for the stage that owns it.
    `options`: what the first stage's run takes besides the config (download: --retry-failed).
    Returns the committed manifest."""
    from capfilt.pipelines.output import OutputLock, StageOutput, read_manifest
    from capfilt.pipelines.provenance import REFUSE, REUSE, decide, source_of
    from capfilt.pipelines.session import spark_session

    if stage.run is None:
        source_manifest = read_manifest(input)  # refuses an uncommitted input
        source = source_of(source_manifest)
    else:
        source_manifest, source = None, stage.source(input)
    out = StageOutput(output_root, stage.name, overwrite=cfg.output.overwrite or recompute)
    fused_scores = _fused_scores(stage, cfg, input, source_manifest) if source_manifest else None
    decision = decide(stage, read_manifest(out.root) if out.complete else None, cfg.to_dict(), source,
                      overwrite=out.overwrite, work_done=fused_scores is not None, inputs=stage.inputs(cfg))
    stage.preflight(out.root, decision, options or {})
    if stage.run is not None:  # the first stage: its run also reads options (a retry ignores the input)
        return stage.run(stage, cfg, input, out, decision, options or {})
    if decision.action == REFUSE:
        raise refused(out.root, decision)
    if decision.action == REUSE:
        print(f"{out.root} is already committed: nothing to do (--overwrite to redo)")
        return read_manifest(out.root)
    if out.complete and not out.overwrite:
        print(f"{out.root} was made with {decision.why}: recomputing what needs no model", flush=True)
    spark = spark_session(cfg.spark)
    passes = [(stage.name, stage.model)] if stage.model and fused_scores is None else []
    with OutputLock(output_root):
        return _run(spark, stage, cfg, input, source_manifest, out, passes + list(fuse) if passes else [],
                    fused_scores)


def refused(root: str, decision) -> ValueError:
    return ValueError(f"{root} is committed, but was made with {decision.why} than this run's: pass --overwrite "
                      f"to recompute it, or choose another output")


def _fused_scores(stage: Stage, cfg, input_root: str, source_manifest: dict) -> str | None:
    """Where a pass fused upstream keeps this stage's model output, computed with this run's settings."""
    if not stage.model:
        return None
    fused = source_manifest.get("fused", {}).get(stage.name)
    if fused and fused["keys"] == pass_keys(cfg, [stage.model]):
        return resolve(_absolute(input_root), fused["dir"])
    return None


def _run(spark, stage: Stage, cfg, input_root: str, source_manifest: dict, out, owned, fused_scores) -> dict:
    import fsspec

    from capfilt.pipelines.output import build_manifest
    from capfilt.pipelines.provenance import source_of

    passes = [p for _, p in owned]
    runtime = (passes[0] if passes else stage.model).settings(cfg) if (passes or stage.model) else None
    chain = Chain.of(input_root, source_manifest, runtime.rows_per_part if runtime else 50_000)
    source = source_of(source_manifest)
    out.begin(resume=True, force=True)
    fs = fsspec.core.url_to_fs(out.root)[0]
    decoded = spark.sparkContext.accumulator(0)
    passed, reused = 0, 0
    stage.reads.validate(view(spark, chain, part=0, images=True), where=f"the rows read from {input_root}")
    if passes:
        fingerprint = hashlib.sha256(json.dumps([source, chain.parts, pass_keys(cfg, passes)],
                                                sort_keys=True, default=str).encode()).hexdigest()
        passed, reused = _model_pass(spark, stage, cfg, chain, out, fs, passes, fingerprint, decoded)
    rows = view(spark, chain)
    if stage.model:
        scores = fused_scores or out.path("model")
        model = spark.read.option("pathGlobFilter", "*.parquet").parquet(scores)
        rows = rows.drop(PART).join(model.select("uid", PART, PASS), "uid")
    context = Context(chain, source_manifest["counts"]["output"], out.path("work"),
                      (lambda: image_bytes(spark, chain)) if stage.images else None)
    result = stage.split(rows, cfg, context)
    counts, written = write_output(out, stage, result.records, result.rejects, source_manifest["counts"]["output"],
                                   cfg.output.compression)
    out.remove("work")  # what the split wrote for itself (decontaminate: the evaluation embeddings)
    if passes and not (stage.keeps_scores or len(passes) > 1):
        out.remove("model")  # nothing reads it again
    loaded = [p for p in passes if p.reference(cfg)]
    figures = {"model_passes": {p.role: passed for p in loaded} or
               ({stage.model.role: 0} if stage.model and stage.model.reference(cfg) else {}),
               "decoded_images": decoded.value, "bytes_written": written}
    manifest = build_manifest(out, cfg.to_dict(), counts, models=with_lineage(stage.models(cfg) | result.report),
                              reasons=stage.reasons_for(cfg), source=source, inputs=stage.inputs(cfg),
                              **chain.to_manifest(stage.name, out.root, fused_scores or (
                                  f"{out.root}/model" if stage.keeps_scores and stage.model else None)),
                              fused={name: {"keys": pass_keys(cfg, [p]), "dir": "model"} for name, p in owned[1:]},
                              figures=figures,
                              **({"parts": {"total": len(chain.parts), "reused_from_a_killed_run": reused}}
                                 if passes else {}))
    figures.update(rates(manifest))
    out.commit(manifest)
    print(f"{out.root}: {counts.input} rows in, {counts.output} out, {counts.rejected_total} rejected "
          f"{counts.rejected.get(stage.name, {})}", flush=True)
    return manifest


def with_lineage(models: dict) -> dict:
    """`models`, plus `lineage` where a local model folder it names was fine-tuned (`capfilt lab finetune`
    writes `finetuned` into its model_card.json): from which model and on which data, round by round, so
    that an OUT of a bootstrap's round k says which OUT made its models."""
    from pathlib import Path
    lineage = {}
    for ref in models.values():
        card = Path(ref) / "model_card.json" if isinstance(ref, str) and ref else None
        if card is None or not card.is_file():
            continue
        try:
            info = json.loads(card.read_text())
        except (OSError, ValueError):
            continue
        rounds = []
        while isinstance(info, dict) and isinstance(info.get("finetuned"), dict):
            tuned = info["finetuned"]
            rounds.append({"model": info.get("reference"), "init": tuned.get("init"),
                           "trained_steps": tuned.get("trained_steps"),
                           "data": [{k: d.get(k) for k in ("path", "kind", "pairs", "finished_at") if k in d}
                                    for d in tuned.get("data", []) if isinstance(d, dict)]})
            info = tuned.get("init_card")
        if rounds:
            lineage[ref] = rounds
    return models | ({"lineage": lineage} if lineage else {})


def image_bytes(spark, chain: Chain):
    """The download's (uid, image): read lazily, where they lie (the one reader of image bytes for a split)."""
    return spark.read.option("pathGlobFilter", "*.parquet").parquet(f"{chain.images}/data").select("uid", "image")


def rates(manifest: dict) -> dict:
    seconds, counts = manifest["seconds"], manifest["counts"]
    return {"seconds": seconds, "rows_in": counts["input"], "rows_out": counts["output"],
            "rows_per_s": round(counts["input"] / seconds, 2) if seconds > 0 else None}


def _model_pass(spark, stage: Stage, cfg, chain: Chain, out, fs, passes, fingerprint: str, decoded):
    """Run the passes part by part into model/capfilt_part=<i>; a part finished by a killed run, or kept by
    the committed output with the same fingerprint, is not run again. Returns (rows run, parts
    finished by a killed run)."""
    from capfilt.udfs.models import check_reference
    model = out.path("model").split("://")[-1]
    marker = f"{model}/fingerprint"
    committed = f"{out.root.split('://')[-1]}/model"
    kept = not cfg.output.overwrite and not fs.exists(marker) and fs.exists(f"{committed}/fingerprint") and \
        fs.cat(f"{committed}/fingerprint").decode() == fingerprint
    if kept:
        # The committed output kept this model output: it stops being committed, and its model output
        # moves into this run (a kill from here on resumes from it).
        fs.rm(f"{out.root.split('://')[-1]}/manifest.json")
        fs.mv(committed, model, recursive=True)
    out.resume(fingerprint, "model/fingerprint")
    todo = [i for i in range(len(chain.parts)) if not fs.exists(f"{model}/{PART}={i}/_SUCCESS")]
    resumed = 0 if kept else len(chain.parts) - len(todo)
    if todo:
        for p in passes:
            ref = p.reference(cfg)
            if ref:
                check_reference(ref, p.role)
            for role, other in p.more_models(cfg).items():
                check_reference(other, role)
    started, done = time.time(), 0
    for n, i in enumerate(todo):
        rows = chain.parts[i]["rows"]
        part_view = view(spark, chain, part=i, images=True)
        stage.reads.validate(part_view, where=f"part {i} of {chain.images}")
        marked = infer(part_view, cfg, passes, decoded).select("uid", PASS)
        marked.write.mode("overwrite").parquet(out.path(f"model/{PART}={i}"))
        done += rows
        rate = done / max(time.time() - started, 1e-9)
        left = sum(chain.parts[j]["rows"] for j in todo[n + 1:])
        print(f"[{stage.name}] part {n + 1}/{len(todo)}: {rows} rows, {rate:.1f} rows/s, about {left / rate:.0f}s left"
              + (f" ({len(chain.parts) - len(todo)} parts kept from before)" if n == 0 and len(todo) < len(chain.parts)
                 else ""), flush=True)
    return done, resumed


def write_output(out, stage: Stage, data, rejects, n_input: int, compression: str = "zstd"):
    """The one writer of a stage: its records (uid, its columns, partitioned by part; the first stage: whole
    records) and its rejects, counted from the files written (what a reader will see is what is counted)."""
    from capfilt.pipelines.io import count_rejects, parquet_rows
    from capfilt.pipelines.output import Counts
    codec = "uncompressed" if compression == "none" else compression
    REJECTS.validate(rejects, where=f"{stage.name} rejects")
    writer = (data.write if stage.adds is None else
              data.select("uid", *[f.name for f in stage.adds], PART).write.partitionBy(PART))
    writer.option("compression", codec).mode("overwrite").parquet(out.data_dir)
    rejects.select(*REJECTS.names).write.option("compression", codec).mode("overwrite").parquet(out.rejects_dir)
    counts = Counts(input=n_input, output=parquet_rows(out.data_dir),
                    rejected=count_rejects(data.sparkSession, out.rejects_dir))
    return counts, folder_bytes(out.path(""))


def folder_bytes(root: str) -> int:
    """Bytes of the Parquet files under root."""
    import fsspec
    fs, path = fsspec.core.url_to_fs(root)
    return sum(info["size"] for info in fs.find(path, detail=True).values() if info["name"].endswith(".parquet"))
