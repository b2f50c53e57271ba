"""What shaping the dataset buys downstream, on a skewed shapes world (not a timed test; docs/quality.md).

A web corpus whose objects' colour x shape concepts follow Zipf's law (`--zipf`, 24 concepts, corpus.json
ranks them) is served on 127.0.0.1 and curated once with the filter as bench/quality.py's `clip` run does
(CapFilt, the fair CLIP). Two more runs reuse its committed stages:

  balanced   + concept balancing (balance.entries = the 24 "colour shape" phrases, balance.t = --t):
             only the balance stage runs
  target     + the target-aware image filter (target.sets = --target-images images of scenes whose every
             object is a circle, from another seed; target.clusters = --clusters): target and dedup run

Fresh small CLIPs (bench/quality.py's train_and_measure: the same architecture, steps and batch for every
arm, one torch thread each) train on each run's curated pairs for each seed, and are measured by R@1 among
1000 (both directions averaged):
  - the unbalanced (`clip`) and `balanced` arms on the uniform held-out set (bench/quality.py's), overall and
    by the rarest concept each held-out scene shows: head third (all its objects among the 8 most frequent
    concepts) and tail third (one among the 8 least frequent);
  - the `clip` (filter alone) and `target` (target ∩ filter) arms on held-out scenes of the target (every
    object a circle), 1000 pairs.
Per seed and paired by seed, as measured.

    .venv/bin/python bench/shaping.py [--n 10000] [--zipf 1.5] [--t 400] [--clusters 64] [--seeds 0 1 2]
        [--steps 600] [--jobs 2] [--work /tmp/capfilt-bench-shaping] [--json docs/shaping.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.quality import (arm_data, curate, load_truth, retrieval_data, run_overrides,  # noqa: E402
                           train_missing, training_args)

CORPUS_SEED = 10_011  # held out, and not bench/quality.py's corpus
TARGET_SEED = 10_012
TARGET_EVAL_SEED = 10_013
THIRD = 8  # concepts per third of the 24


def on_target(scene) -> bool:
    return all(o.shape == "circle" for o in scene.objects)


def target_images(folder: Path, n: int) -> Path:
    """n 64-px JPEGs of target scenes (every object a circle), from their own seed, uniform colours."""
    import numpy as np

    from capfilt.world.scene import encode_jpeg, render, sample_scene
    if folder.exists() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng, made = np.random.default_rng(TARGET_SEED), 0
    while made < n:
        scene = sample_scene(rng)
        if on_target(scene):
            (folder / f"{made:05d}.jpg").write_bytes(encode_jpeg(render(scene, 64, rng), 90))
            made += 1
    return folder


def target_eval(n: int = 1000):
    """(images, texts, keys) of n held-out annotated pairs of target scenes."""
    import numpy as np

    from capfilt.lab.data import annotated
    from capfilt.world.captions import N_PHRASINGS
    pool = annotated(16 * n, TARGET_EVAL_SEED)
    keep = [i for i, s in enumerate(pool.scenes) if on_target(s)][:n]
    if len(keep) < n:
        raise SystemExit(f"only {len(keep)} target scenes among {16 * n} held-out ones")
    return (np.stack([pool.images[i] for i in keep]), [pool.captions[i][j % N_PHRASINGS] for j, i in enumerate(keep)],
            [pool.scenes[i].to_json() for i in keep])


def thirds(keys: list[str], ranking: list) -> dict[str, list[int]]:
    """Held-out pairs by the rank of the rarest concept their scene shows: head (< 8) and tail (>= 16)."""
    from capfilt.world.scene import Scene
    rank = {(c, s): i for i, (c, s, _) in enumerate(ranking)}
    rarest = [max(rank[(o.colour, o.shape)] for o in Scene.from_json(k).objects) for k in keys]
    return {"head": [i for i, r in enumerate(rarest) if r < THIRD],
            "tail": [i for i, r in enumerate(rarest) if r >= 2 * THIRD]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--zipf", type=float, default=1.5)
    ap.add_argument("--t", type=int, default=400, help="balance.t")
    ap.add_argument("--clusters", type=int, default=64, help="target.clusters")
    ap.add_argument("--target-images", type=int, default=300)
    training_args(ap, "/tmp/capfilt-bench-shaping")
    args = ap.parse_args()

    import numpy as np

    from capfilt.world.corpus import make_web_corpus, write_metadata
    from capfilt.world.scene import CONCEPTS
    from capfilt.world.server import serve
    work = Path(args.work)
    corpus = work / f"world-{args.n}-zipf{args.zipf}"
    if not (corpus / "truth.parquet").exists():
        make_web_corpus(corpus, n=args.n, seed=CORPUS_SEED, slow_ms=200, overwrite=True, zipf=args.zipf)
    summary = json.loads((corpus / "corpus.json").read_text())
    ranking = summary["concepts"]
    entries = work / "concepts.txt"
    entries.write_text("".join(f"{c} {s}\n" for c, s in CONCEPTS))
    folder = target_images(work / "target", args.target_images)
    clip = run_overrides()["clip"]
    runs = {"clip": work / f"out-{args.n}-zipf{args.zipf}-clip",
            "balanced": work / f"out-{args.n}-zipf{args.zipf}-balanced-t{args.t}",
            "target": work / f"out-{args.n}-zipf{args.zipf}-target-k{args.clusters}-{args.target_images}"}
    overrides = {"clip": clip, "balanced": clip + [f"balance.entries={entries}", f"balance.t={args.t}"],
                 "target": clip + [f"target.sets=[{folder}]", f"target.clusters={args.clusters}"]}
    reuse = {"clip": None, "balanced": (runs["clip"], ["download", "caption", "filter", "dedup"]),
             "target": (runs["clip"], ["download", "caption", "filter"])}
    port_file, metadata = work / "port", corpus / "metadata.parquet"
    seconds = {}
    with serve(corpus / "site", port=int(port_file.read_text()) if port_file.exists() else 0) as server:
        if not (port_file.exists() and metadata.exists()):
            port_file.write_text(str(server.port))
            metadata = write_metadata(corpus, server.base_url)
        for name, out in runs.items():
            seconds[name] = round(curate(metadata, out, server.port, overrides[name], reuse[name]), 1)
    manifests = {name: json.loads((out / "manifest.json").read_text()) for name, out in runs.items()}
    report = {"corpus": {k: summary[k] for k in ("seed", "n", "params", "concepts", "noise_share")},
              "runs": overrides, "curate_seconds": seconds,
              "curated": {name: m["counts"]["output"] for name, m in manifests.items()},
              "balance": {k: v for k, v in manifests["balanced"]["models"]["balance"].items() if k != "curve"},
              "target": manifests["target"]["models"]["target"]["target"],
              "settings": {k: getattr(args, k) for k in ("steps", "batch", "lr", "seeds", "eval_n", "zipf", "t",
                                                         "clusters", "target_images")}}
    print(json.dumps({k: report[k] for k in ("curated", "curate_seconds")}), flush=True)

    truth = load_truth(corpus)
    data = arm_data(runs, truth, seed=0)
    cache = work / "downstream"
    cache.mkdir(exist_ok=True)
    uniform = retrieval_data(args.eval_n)
    target = target_eval(1000)
    files = {}
    for name, (images, texts, keys), arms in (("uniform", uniform, ("clip", "balanced")), ("target", target, ("clip", "target"))):
        files[name] = work / f"arms-{name}.npz"
        np.savez(files[name], eval_images=images, eval_texts=np.array(texts), eval_keys=np.array(keys),
                 **{f"{a}_images": data[a][0] for a in arms}, **{f"{a}_captions": np.array(data[a][1]) for a in arms})
    tag = f"{args.steps}x{args.batch}-lr{args.lr}"
    tasks = {cache / f"{evalset}-{arm}-{runs[arm].name}-seed{seed}-{tag}.json":
             (arm, seed, args.steps, args.batch, args.lr, str(files[evalset]))
             for evalset, arms in (("uniform", ("clip", "balanced")), ("target", ("clip", "target")))
             for arm in arms for seed in args.seeds}
    started = time.time()
    train_missing(tasks, args.jobs)
    results = {p: json.loads(p.read_text()) for p in tasks}
    groups = thirds(uniform[2], ranking)
    per_seed = {}
    for path, r in results.items():
        evalset = path.name.split("-", 1)[0]
        hits = np.asarray(r["hits_1000"])
        row = {"all": round(float(hits.mean()), 4)}
        if evalset == "uniform":
            row |= {third: round(float(hits[idx].mean()), 4) for third, idx in groups.items()}
        per_seed.setdefault(f"{evalset}/{r['arm']}", {})[r["seed"]] = row | {"train_images": r["train_images"]}
    report["downstream"] = per_seed
    report["held_out"] = {"uniform": len(uniform[2]), "head": len(groups["head"]), "tail": len(groups["tail"]),
                          "target": len(target[2])}
    report["train_seconds"] = round(time.time() - started, 1)
    deltas = {"balanced - unbalanced (uniform)": ("uniform/balanced", "uniform/clip", ("all", "head", "tail")),
              "target ∩ filter - filter (target)": ("target/target", "target/clip", ("all",))}
    report["deltas"] = {}
    for label, (a, b, parts) in deltas.items():
        report["deltas"][label] = {part: {seed: round(per_seed[a][seed][part] - per_seed[b][seed][part], 4)
                                          for seed in args.seeds} for part in parts}
    print(json.dumps({"held_out": report["held_out"], "downstream": per_seed, "deltas": report["deltas"]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
