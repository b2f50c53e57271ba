"""Command line of the shapes world: `generate` a corpus, write an `eval-set`, `serve` a corpus on loopback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from capfilt.world.corpus import METADATA_FORMATS, make_annotated, make_web_corpus, write_metadata
from capfilt.world.evalset import EVAL_FORMATS, make_eval_set
from capfilt.world.server import PortUnavailable, WorldServer, serve_until_interrupted


def _world_names() -> set[str]:
    """What `generate`, `serve` and `--annotated` write in a corpus folder."""
    return {"site", "truth.parquet", "corpus.json", "annotated.parquet", *(f"metadata.{f}" for f in METADATA_FORMATS)}


def _check_corpus_folder(out: Path) -> None:
    """--out must be new, empty, or a corpus folder: --overwrite removes its site/ and metadata, so a
    folder holding anything the world did not write is refused, with or without it."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _world_names())
    if foreign:
        raise ValueError(f"--out {out} holds files the shapes world did not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): generate into a new or empty folder; "
                         f"--overwrite replaces only a corpus")


def _generate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    for option, value in (("--noise", args.noise), ("--duplicates", args.duplicates),
                          ("--fault-rate", args.fault_rate), ("--watermark-rate", args.watermark_rate),
                          ("--eval-rate", args.eval_rate)):
        if not 0 <= value <= 1:  # also refuses nan
            raise ValueError(f"{option} must be a share between 0 and 1, not {value}")
    for option, value in (("--n", args.n), ("--seed", args.seed), ("--slow-ms", args.slow_ms),
                          ("--annotated", args.annotated)):
        if value < 0:
            raise ValueError(f"{option} must be 0 or more, not {value}")
    image_size = _value_or_range("--image-size", args.image_size, 16, 4096)
    jpeg_quality = _value_or_range("--jpeg-quality", args.jpeg_quality, 1, 100)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    _check_corpus_folder(out)
    if args.eval_set is not None and not Path(args.eval_set).exists():
        raise ValueError(f"--eval-set {args.eval_set} does not exist: write one with `eval-set --out DIR --n N`")
    try:
        summary = make_web_corpus(out, args.n, args.seed, noise=args.noise, duplicates=args.duplicates,
                                  fault_rate=args.fault_rate, slow_ms=args.slow_ms, image_size=image_size,
                                  jpeg_quality=jpeg_quality, overwrite=args.overwrite,
                                  watermark_rate=args.watermark_rate, eval_set=args.eval_set,
                                  eval_rate=args.eval_rate, zipf=args.zipf)
    except FileExistsError:
        raise ValueError(f"{out} already holds a corpus: pass --overwrite to replace it") from None
    print(f"web corpus: {out / 'site'} (files), {out / 'truth.parquet'} (ground truth), {out / 'corpus.json'}")
    if args.annotated:
        print(f"annotated split: {make_annotated(out, args.annotated, args.seed)} ({args.annotated} images)")
    mix = {k: summary[k] for k in ("kinds", "faults", "variants", "image_rows", "noise_share", "watermarked",
                                   "planted") if k in summary}
    print(json.dumps(mix, indent=2))
    print(f"next: serve it with `serve {out}` to write {out / 'metadata.parquet'}")
    return 0


def _eval_set(args: argparse.Namespace) -> int:
    for option, value in (("--n", args.n), ("--shard-size", args.shard_size)):
        if value < 1:
            raise ValueError(f"{option} must be 1 or more, not {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, not {args.seed}")
    image_size = _value_or_range("--image-size", args.image_size, 16, 4096)
    jpeg_quality = _value_or_range("--jpeg-quality", args.jpeg_quality, 1, 100)
    if isinstance(image_size, tuple) or isinstance(jpeg_quality, tuple):
        raise ValueError("--image-size and --jpeg-quality take one value for an evaluation set")
    try:
        manifest = make_eval_set(args.out, args.n, args.seed, args.format, image_size, jpeg_quality,
                                 args.shard_size, overwrite=args.overwrite)
    except FileExistsError:
        raise ValueError(f"{args.out} already holds an evaluation set: pass --overwrite to replace it") from None
    print(f"evaluation set: {args.n} images ({args.format}) in {args.out}, manifest {manifest}")
    print(f"plant copies of it in a corpus with `generate --out DIR --n N --eval-set {args.out} --eval-rate 0.01`")
    return 0


def _serve(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if not ((out / "site" / "img").is_dir() and (out / "truth.parquet").is_file()):
        raise ValueError(f"{out} is not a corpus (no site/img and truth.parquet): write one with "
                         f"`capfilt world generate --out {out} --n N`")
    if not os.access(out, os.W_OK):
        raise ValueError(f"{out} is not writable: serve writes the metadata for its port there")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, not {args.port}")

    tls = None
    if args.tls:
        from capfilt.world.tls import CA_FILE, CERT_FILE, make_certificates, server_context
        tls = out / "tls"
        if not (tls / CERT_FILE).is_file():
            make_certificates(tls)
        try:  # a certificate folder someone changed: one line, not a traceback from the server's start
            server_context(tls)
        except (OSError, ValueError) as e:
            raise ValueError(f"{tls}: its certificate or key does not load ({e}); remove the folder to make a "
                             f"new test CA") from None

    def announce(server: WorldServer) -> None:
        paths = [write_metadata(out, server.base_url, fmt=fmt) for fmt in args.format or ["parquet"]]
        print(f"serving {out / 'site'} at {server.base_url}", flush=True)
        if tls is not None:
            print(f"its certificate is signed by a test CA: trust it with --set download.ca_bundle={tls / CA_FILE}",
                  flush=True)
        for path in paths:
            print(f"metadata: {path}", flush=True)
        print("Ctrl-C to stop", flush=True)

    try:
        serve_until_interrupted(out / "site", args.port, on_start=announce, tls=tls, keep_alive=args.keep_alive)
    except PortUnavailable as e:
        raise ValueError(f"{e}: choose another with --port, or --port 0 for any free one") from None
    print("stopped")
    return 0


def _value_or_range(option: str, text: str, low_bound: int, high_bound: int) -> int | tuple[int, int]:
    """N, or LOW-HIGH (each image draws from the inclusive range), within the bounds."""
    try:
        parts = [int(p) for p in text.split("-", 1)]
    except ValueError:
        parts = []
    if not parts or parts != sorted(parts) or not all(low_bound <= p <= high_bound for p in parts):
        raise ValueError(f"{option} takes N or LOW-HIGH with values from {low_bound} to {high_bound}, not {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capfilt world",
        description="The shapes world: a synthetic image-text domain with ground truth, and a loopback "
                    "web server with faults, standing in for the web and for COCO. See docs/world.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="write a noisy web corpus (and optionally a clean annotated split)",
        description="Write OUT/site (files to serve), OUT/truth.parquet (ground truth, for tests and "
                    "benchmarks only) and OUT/corpus.json (the mix produced). Same seed, same bytes.")
    generate.add_argument("--out", required=True, help="output directory")
    generate.add_argument("--n", type=int, required=True, help="number of web corpus rows")
    generate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    generate.add_argument("--noise", type=float, default=0.45,
                          help="share of plain rows whose caption does not fit the image (default 0.45)")
    generate.add_argument("--duplicates", type=float, default=0.06,
                          help="share of plain rows that duplicate another row (default 0.06)")
    generate.add_argument("--fault-rate", type=float, default=0.04,
                          help="share of rows that are faults; each fault kind appears at least once "
                               "(default 0.04)")
    generate.add_argument("--slow-ms", type=int, default=2000, help="delay of the slow fault in ms (default 2000)")
    generate.add_argument("--image-size", default="64", metavar="N|LOW-HIGH",
                          help="side of the square images in px, or a range each image draws from: "
                               "512-2048 for web sizes (default 64)")
    generate.add_argument("--jpeg-quality", default="90", metavar="N|LOW-HIGH",
                          help="JPEG quality, or a range each image draws from, as on the web: 60-95 (default 90)")
    generate.add_argument("--annotated", type=int, default=0, metavar="N",
                          help="also write OUT/annotated.parquet with N clean captioned images")
    generate.add_argument("--watermark-rate", type=float, default=0.0, metavar="SHARE",
                          help="share of rows whose image gets a translucent word or logo (truth: watermark; "
                               "default 0: none)")
    generate.add_argument("--eval-set", metavar="DIR",
                          help="an evaluation set (written by `eval-set`, any format) to plant modified copies of")
    generate.add_argument("--eval-rate", type=float, default=0.01, metavar="SHARE",
                          help="with --eval-set: share of rows whose image becomes a cropped, resized, "
                               "re-encoded copy of an evaluation image (truth: eval_id; default 0.01)")
    generate.add_argument("--zipf", type=float, default=0.0, metavar="EXPONENT",
                          help="a skewed world: the objects' colour x shape concepts follow Zipf's law with this "
                               "exponent (corpus.json lists them, most frequent first; default 0: uniform)")
    generate.add_argument("--overwrite", action="store_true", help="replace an existing corpus in OUT")
    generate.set_defaults(run=_generate)

    eval_cmd = commands.add_parser(
        "eval-set", help="write a held-out evaluation set (folder of JPEGs, Parquet or WebDataset)",
        description="Write N evaluation images, rendered from the seed's own stream (no corpus or annotated "
                    "split draws them), as OUT/<id>.jpg (folder), OUT/eval.parquet with key and image "
                    "(parquet) or OUT/eval-000000.tar... with <key>.jpg members (wds), plus OUT/eval_set.json "
                    "(ids, scenes, sha256). The same ids in every format. Same seed, same bytes.")
    eval_cmd.add_argument("--out", required=True, help="output directory (new or empty, or an evaluation set)")
    eval_cmd.add_argument("--n", type=int, default=200, help="number of images (default 200)")
    eval_cmd.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    eval_cmd.add_argument("--format", choices=EVAL_FORMATS, default="folder", help="layout (default folder)")
    eval_cmd.add_argument("--image-size", default="64", metavar="N", help="side in px (default 64)")
    eval_cmd.add_argument("--jpeg-quality", default="90", metavar="N", help="JPEG quality (default 90)")
    eval_cmd.add_argument("--shard-size", type=int, default=1000, help="images per tar with --format wds (default 1000)")
    eval_cmd.add_argument("--overwrite", action="store_true", help="replace an evaluation set in OUT")
    eval_cmd.set_defaults(run=_eval_set)

    serve_cmd = commands.add_parser(
        "serve", help="serve DIR/site on 127.0.0.1 (HTTP, or HTTPS with --tls) and write DIR/metadata.parquet for it",
        description="Serve DIR/site on 127.0.0.1 until Ctrl-C. The metadata's URLs name the server's "
                    "port, so it is (re)written at start: DIR/metadata.<format>.")
    serve_cmd.add_argument("dir", metavar="DIR", help="a directory written by `generate`")
    serve_cmd.add_argument("--port", type=int, default=0, help="port to bind (default: an ephemeral one)")
    serve_cmd.add_argument("--format", action="append", choices=METADATA_FORMATS,
                           help="metadata format, repeatable (default: parquet)")
    serve_cmd.add_argument("--tls", action="store_true",
                           help="serve HTTPS with a certificate from a test CA written to DIR/tls (once; ca.pem is "
                                "what a client trusts: download.ca_bundle)")
    serve_cmd.add_argument("--keep-alive", action="store_true",
                           help="answer in HTTP/1.1 and keep connections open between requests, as web servers do "
                                "(default: HTTP/1.0, one request per connection)")
    serve_cmd.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """User errors are one line and exit 2, whether run as `capfilt world` or `python -m capfilt.world.cli`."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"capfilt world: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
