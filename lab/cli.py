"""`python -m capfilt.lab`: train the shapes-world models and measure them on held-out seeds.

    python -m capfilt.lab train clip --out models/shapes-clip --seed 0
    python -m capfilt.lab train clip-web --out models/shapes-clip-web --seed 0
    python -m capfilt.lab train captioner --out models/shapes-captioner --seed 0
    python -m capfilt.lab train itm --out models/shapes-itm --seed 0
    python -m capfilt.lab eval --clip models/shapes-clip --captioner models/shapes-captioner
    python -m capfilt.lab eval --clip models/shapes-clip-web --itm models/shapes-itm
    python -m capfilt.lab train-head --kind watermark --out models/shapes-watermark-head
    python -m capfilt.lab eval-head --head models/shapes-watermark-head --seed 10000
    python -m capfilt.lab finetune itm --init models/shapes-itm --data OUT --data annotated.parquet --out round2-itm

`train` measures the fresh model with `eval` and writes the figures into its model_card.json;
`train-head` measures the head on a held-out seed and writes the figures into its card.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from capfilt.lab.data import EVAL_SEED_BASE

# lab/finetune.py's budget and held-out share unless told otherwise
FINETUNE = {"steps": 500, "batch": 32, "lr": 1e-4, "heldout": 500, "neighbours": 8}

DEFAULTS = {  # the budgets the committed checkpoints were trained with (docs/models.md)
    # bf16 autocast: 1.5-1.8x faster for BLIP on this CPU (AMX), slower for open_clip's CLIP (measured)
    "clip": {"steps": 1500, "n_train": 20000, "batch": 128, "lr": 1e-3, "bf16": False},
    # clean and web phrasings, a token set with the web words: the fair filter-only baseline
    "clip-web": {"steps": 1500, "n_train": 20000, "batch": 128, "lr": 1e-3, "bf16": False},
    "captioner": {"steps": 5000, "n_train": 20000, "batch": 64, "lr": 1e-3, "bf16": True},
    # initialised from models/shapes-captioner (lab/train_itm.py)
    "itm": {"steps": 2000, "n_train": 20000, "batch": 64, "lr": 5e-4, "bf16": True},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m capfilt.lab", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model and write its checkpoint folder")
    train.add_argument("model", choices=sorted(DEFAULTS))
    train.add_argument("--out", required=True, help="checkpoint folder to write")
    train.add_argument("--seed", type=int, default=0, help=f"training seed (held-out eval seeds start at {EVAL_SEED_BASE})")
    train.add_argument("--steps", type=int, help="optimiser steps (the reproducible budget)")
    train.add_argument("--minutes", type=float, default=20.0,
                       help="wall-clock cap: stop early (and say so in the model card) if the steps take longer")
    train.add_argument("--n-train", type=int, help="images in the training split")
    train.add_argument("--batch", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--threads", type=int, help="torch threads (default 1: see docs/models.md)")
    precision = train.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                           help="bfloat16 autocast, fp32 master weights (default for the captioner)")
    precision.add_argument("--fp32", dest="bf16", action="store_false", help="plain fp32 (default for clip)")
    train.add_argument("--no-eval", action="store_true", help="skip measuring the fresh model")
    train.add_argument("--resume", help="itm: go on training this ITM folder (its card becomes the first phase)")
    train.add_argument("--weights", type=lambda t: {k: float(v) for k, v in (kv.split("=") for kv in t.split(","))},
                       metavar="ATTR=ODDS,...", help="itm: the hard negatives' attribute odds, e.g. shape=3,size=0.5")
    ev = commands.add_parser("eval", help="measure a filter and/or a captioner on held-out seeds")
    ev.add_argument("--clip", help="CLIP reference (any the loader takes)")
    ev.add_argument("--captioner", help="captioner reference (any the loader takes)")
    ev.add_argument("--itm", help="ITM reference (a BLIP ITM folder or hub id)")
    ev.add_argument("--seed", type=int, default=EVAL_SEED_BASE, help="held-out seed")
    ev.add_argument("--n-web", type=int, default=2000, help="web-corpus rows for the filter AUC")
    ev.add_argument("--n-pairs", type=int, default=1000, help="annotated images for the ranking checks")
    ev.add_argument("--n-captions", type=int, default=500, help="images to caption")
    ev.add_argument("--top-p", type=float, default=0.9)
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--json", help="also write the report to this file")
    ev.add_argument("--update-card", action="store_true",
                    help="write the figures into the model_card.json of local checkpoint folders")
    head = commands.add_parser("train-head", help="train a head over the stored CLIP image embedding (lab/head.py)")
    head.add_argument("--kind", required=True, choices=["watermark"], help="what the head detects")
    head.add_argument("--out", required=True, help="head folder to write (head.safetensors, card.json)")
    head.add_argument("--seed", type=int, default=0, help="training seed (validation uses seed + 1)")
    head.add_argument("--heldout-seed", type=int, default=EVAL_SEED_BASE, help="held-out seed for the card's metrics")
    head.add_argument("--architecture", choices=["linear", "mlp"])
    head.add_argument("--hidden", type=lambda t: [int(w) for w in t.split(",")], metavar="W,W",
                      help="hidden layer widths of an mlp (default 384,384)")
    head.add_argument("--n-train", type=int, help="corpus rows of the training seed (each clean and marked: 2x images)")
    head.add_argument("--n-val", type=int, help="validation images (threshold)")
    head.add_argument("--n-eval", type=int, help="held-out images")
    head.add_argument("--steps", type=int)
    head.add_argument("--batch", type=int)
    head.add_argument("--lr", type=float)
    head.add_argument("--min-precision", type=float, help="the threshold keeps at least this validation precision")
    head.add_argument("--threads", type=int, help="torch threads (default 1)")
    eh = commands.add_parser("eval-head", help="measure a head folder at its own threshold on a fresh held-out corpus")
    eh.add_argument("--head", required=True, help="head folder (card.json + head.safetensors)")
    eh.add_argument("--seed", type=int, default=EVAL_SEED_BASE, help="held-out seed")
    eh.add_argument("--n", type=int, default=4000, help="images (half watermarked)")
    eh.add_argument("--threads", type=int, default=1)
    ft = commands.add_parser("finetune", help="fine-tune a captioner, an ITM or a CLIP on pairs from data "
                                              "(lab/finetune.py)")
    ft.add_argument("model", choices=["captioner", "itm", "clip"])
    ft.add_argument("--init", required=True, help="the model to start from: any reference the loader reads as this role")
    ft.add_argument("--data", required=True, action="append",
                    help="a curated OUT, a WebDataset (.tar or a folder of them) or a Parquet of pairs; repeatable")
    ft.add_argument("--out", required=True, help="checkpoint folder to write (must not exist)")
    ft.add_argument("--steps", type=int, default=FINETUNE["steps"], help="optimiser steps (default %(default)s)")
    ft.add_argument("--batch", type=int, default=FINETUNE["batch"], help="images per step and process (default %(default)s)")
    ft.add_argument("--lr", type=float, default=FINETUNE["lr"], help="peak learning rate (default %(default)s)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--heldout", type=int, default=FINETUNE["heldout"],
                    help="pairs held out and measured before and after (at most a fifth; default %(default)s)")
    ft.add_argument("--neighbours", type=int, default=FINETUNE["neighbours"],
                    help="itm, clip: nearest images whose captions are negatives (default %(default)s)")
    ft.add_argument("--minutes", type=float, help="wall-clock cap: stop early (and say so in the card)")
    ft.add_argument("--threads", type=int, help="torch threads (default 1)")
    ft_precision = ft.add_mutually_exclusive_group()
    ft_precision.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                              help="bfloat16 autocast (default on a GPU)")
    ft_precision.add_argument("--fp32", dest="bf16", action="store_false", help="plain fp32 (default on CPU)")
    ft.add_argument("--shapes-eval", action="store_true",
                    help="also measure the result on the shapes world's held-out seed (lab eval) into the card")
    return parser


def _finetune(args) -> int:
    from capfilt.lab.finetune import finetune
    for name in ("steps", "batch", "heldout"):
        if getattr(args, name) < (0 if name == "heldout" else 1):
            raise ValueError(f"--{name} {getattr(args, name)}: must be {'>= 0' if name == 'heldout' else '>= 1'}")
    if not args.lr > 0:
        raise ValueError(f"--lr {args.lr}: must be > 0")
    if args.neighbours < 1:
        raise ValueError(f"--neighbours {args.neighbours}: must be >= 1")
    card = finetune(args.model, args.init, args.data, Path(args.out), steps=args.steps, batch=args.batch, lr=args.lr,
                    seed=args.seed, heldout=args.heldout, neighbours=args.neighbours, minutes=args.minutes,
                    threads=args.threads, bf16=args.bf16)
    if card is None:  # a torchrun process other than rank 0
        return 0
    if args.shapes_eval:
        import torch
        torch.set_num_threads(args.threads or 1)
        card["metrics"]["shapes"] = evaluate(**{f"{args.model}_ref": args.out})[args.model]
        (Path(args.out) / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"fine-tuned {args.model} from {args.init}: {card['finetuned']['trained_steps']} steps on "
          f"{card['finetuned']['pairs_trained_on']} pairs -> {args.out}")
    print(json.dumps(card["metrics"], indent=2))
    return 0


def _train_head(args) -> int:
    from capfilt.lab.train_head import train_head
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")  # as `train`: the committed folder is never half-written
    shutil.rmtree(partial, ignore_errors=True)
    overrides = {k: getattr(args, k) for k in ("architecture", "hidden", "n_train", "n_val", "n_eval", "steps",
                                               "batch", "lr", "min_precision")}
    card = train_head(partial, args.kind, args.seed, args.heldout_seed, args.threads, **overrides)
    card["metrics"]["command"] = f"python -m capfilt.lab eval-head --head {args.out} --seed {args.heldout_seed}"
    (partial / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    print(f"trained {args.kind} head in {card['trained_on']['train_seconds']:.0f}s "
          f"(data {card['trained_on']['data_seconds']:.0f}s) -> {out}")
    print(json.dumps(card["metrics"], indent=2))
    return 0


def evaluate(clip_ref=None, captioner_ref=None, seed=EVAL_SEED_BASE, n_web=2000, n_pairs=1000, n_captions=500,
             top_p=0.9, itm_ref=None) -> dict:
    from capfilt.lab.evaluate import attribute_table, captioner_metrics, clip_metrics, itm_metrics
    from capfilt.udfs.models import load_captioner, load_clip, load_itm
    report = {}
    if clip_ref:
        report["clip"] = {"reference": clip_ref, **clip_metrics(load_clip(clip_ref), n_web, n_pairs, seed)}
    if itm_ref:
        report["itm"] = {"reference": itm_ref, **itm_metrics(load_itm(itm_ref), n_web, n_pairs, seed)}
    if clip_ref and itm_ref:  # side by side, as docs/models.md shows them
        report["attribute_auc"] = attribute_table(report)
    if captioner_ref:
        report["captioner"] = {"reference": captioner_ref,
                               **captioner_metrics(load_captioner(captioner_ref), n_captions, seed, top_p)}
    return report


def _read_card(folder: str) -> dict | None:
    """A local checkpoint folder's model_card.json (None where there is none); one that is not a JSON
    object is refused naming the file (--update-card checks every card before the evaluation runs)."""
    from capfilt.udfs.models.check import json_object
    card_path = Path(folder) / "model_card.json"
    return json_object(card_path, "--update-card") if card_path.is_file() else None


def _update_card(folder: str, metrics: dict, command: str) -> None:
    card = _read_card(folder)
    if card is None:
        return
    card_path = Path(folder) / "model_card.json"
    card["metrics"] = {**{k: v for k, v in metrics.items() if k != "reference"}, "command": command}
    card_path.write_text(json.dumps(card, indent=2) + "\n")


REPORT_KEYS = {"clip", "itm", "captioner", "attribute_auc"}  # what `eval --json` writes


def check_model_out(out: Path, card: str) -> None:
    """--out is replaced whole once training ends: refuse, before training, anything there that is not
    a folder lab wrote (its `card`), so that minutes of training never end in deleting a stranger."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a model folder")
    if out.is_dir() and any(out.iterdir()) and not (out / card).is_file():
        raise ValueError(f"--out {out} holds files but no {card}: not a model folder lab wrote, and --out is "
                         f"replaced whole; choose a new or empty folder")


def check_report_out(file: Path) -> None:
    """`eval --json FILE` replaces only an earlier eval report (never a model's config or a card)."""
    if file.is_dir():
        raise ValueError(f"--json {file} is a folder: name a file")
    if not file.exists():
        return
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = None
    if not (isinstance(report, dict) and report and set(report) <= REPORT_KEYS):
        raise ValueError(f"--json {file} exists and is not an eval report: name a new file")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # what a run would replace, before any training (one line, as every capfilt refusal)
        if args.command in ("train", "train-head"):
            check_model_out(Path(args.out), "model_card.json" if args.command == "train" else "card.json")
        elif args.command == "eval" and args.json:
            check_report_out(Path(args.json))
    except ValueError as e:
        print(f"capfilt: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "finetune":
        from capfilt.udfs.models.errors import ModelNotAvailable, UnsafeCheckpoint
        try:
            return _finetune(args)
        except (ValueError, FileNotFoundError, ModelNotAvailable, UnsafeCheckpoint) as e:  # bad input: one line
            print(f"capfilt: error: {e}", file=sys.stderr)
            return 2
    import torch
    if args.command == "train-head":
        return _train_head(args)
    if args.command == "eval-head":
        from capfilt.lab.train_head import eval_head
        print(json.dumps(eval_head(args.head, args.seed, args.n, args.threads), indent=2))
        return 0
    if args.command == "train":
        settings = dict(DEFAULTS[args.model])
        for key in ("steps", "n_train", "batch", "lr", "bf16"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        if args.model in ("clip", "clip-web"):
            from capfilt.lab.train_clip import train
            settings["web"] = args.model == "clip-web"
        elif args.model == "itm":
            from capfilt.lab.train_itm import train
            settings.update(resume=args.resume, weights=args.weights)
        else:
            from capfilt.lab.train_captioner import train
        # Train and measure in a sibling folder, then swap it in: a committed checkpoint is never
        # half-written while training runs (the folder is in the repository).
        out = Path(args.out)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        card = train(partial, seed=args.seed, minutes=args.minutes, threads=args.threads, **settings)
        print(f"trained {args.model}: {card['training']['trained_steps']} steps in "
              f"{card['training']['train_seconds']:.0f}s -> {args.out}")
        card_path = partial / "model_card.json"
        card = json.loads(card_path.read_text())
        card["reference"] = args.out
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        if not args.no_eval:
            torch.set_num_threads(args.threads or 1)
            kind = "clip" if args.model.startswith("clip") else args.model
            report = evaluate(**{f"{kind}_ref": str(partial)})
            metrics = report[kind]
            _update_card(partial, metrics, f"python -m capfilt.lab eval --{kind} {args.out}")
            print(json.dumps(metrics, indent=2))
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
        return 0
    if not (args.clip or args.captioner or args.itm):
        print("eval: give --clip, --itm and/or --captioner", file=sys.stderr)
        return 2
    if args.update_card:  # before minutes of evaluation, not after
        for ref in (args.clip, args.captioner, args.itm):
            if ref:
                _read_card(ref)
    torch.set_num_threads(args.threads)
    report = evaluate(args.clip, args.captioner, args.seed, args.n_web, args.n_pairs, args.n_captions, args.top_p,
                      args.itm)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.update_card:
        command = "python -m capfilt.lab " + " ".join(argv if argv is not None else sys.argv[1:])
        for key, ref in (("clip", args.clip), ("captioner", args.captioner), ("itm", args.itm)):
            if ref and key in report:
                _update_card(ref, report[key], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
