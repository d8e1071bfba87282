"""`python -m trainers.datasets convert-voc SRC DST`, `... check ROOT` and `... cache ROOT`.

Exit status: 0 done, 1 strict check with problems, 2 bad arguments (one line on stderr).
Imports of the tools happen inside the commands, so `--help` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys

PROG = "python -m trainers.datasets"
SPLIT_NAMES = ("train", "val", "test")


class _Parser(argparse.ArgumentParser):
    """argparse with its error on one line: what is wrong and where to look."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status."""
    args = _parser().parse_args(argv)
    return args.run(args)


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Dataset tools for the wsolevaluation layout.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{convert-voc,check,cache}")
    voc = commands.add_parser("convert-voc", help="convert a Pascal VOC style folder (one class per image)",
                              description="Convert a Pascal VOC style folder (images + XML, one class per "
                                          "image) into DST/images, DST/metadata/{train,val,test}, DST/classes.txt.")
    voc.add_argument("src", help="folder holding the images and XML annotations, in any subfolders")
    voc.add_argument("dst", help="new or empty folder to write")
    voc.add_argument("--splits", default="0.7,0.1,0.2", help="train,val,test fractions (default 0.7,0.1,0.2)")
    voc.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    voc.set_defaults(run=_convert_voc)
    check = commands.add_parser("check", help="check metadata and decode every image",
                                description="Check the metadata of each split and decode every image; "
                                            "prints every problem as file:line: message.")
    check.add_argument("root", help="images root (image ids are relative to it)")
    check.add_argument("--metadata", help="metadata root holding train/ val/ test/ (default ROOT/metadata)")
    check.add_argument("--splits", default="train,val,test", help="splits to check (default train,val,test)")
    check.add_argument("--no-decode", action="store_true", help="check the metadata only, decode no image")
    check.add_argument("--lenient", action="store_true", help="report problems but exit 0 (bad images skipped)")
    check.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    check.set_defaults(run=_check)
    cache = commands.add_parser(
        "cache", help="decode and resize every image into this node's image cache, on all cores",
        description="Fill this node's image cache (trainers/datasets/cache.py) before training: each train "
                    "image resized as data.resize and data.resize_size say, each val and test image to "
                    "data.crop_size. Training fills it by itself on its first reads; this does it on every "
                    "core at once (e.g. in cluster.yaml's worker_setup_commands, after copying the data).")
    cache.add_argument("root", help="images root (image ids are relative to it)")
    cache.add_argument("--metadata", help="metadata root holding train/ val/ test/ (default ROOT/metadata)")
    cache.add_argument("--splits", default="train,val,test", help="splits to cache (default train,val,test)")
    cache.add_argument("--resize-size", type=int, default=256, help="data.resize_size (default 256)")
    cache.add_argument("--resize", choices=["square", "shorter_side"], default="square",
                       help="data.resize (default square)")
    cache.add_argument("--crop-size", type=int, default=224, help="data.crop_size (default 224)")
    cache.add_argument("--cache-dir", help="data.cache_dir (default $HAS_SWEEP_CACHE, else $XDG_CACHE_HOME/has-sweep/images "
                            "or ~/.cache/has-sweep/images)")
    cache.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="processes (default: every core of this machine)")
    cache.set_defaults(run=_cache)
    return parser


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return 2


def _convert_voc(args: argparse.Namespace) -> int:
    from trainers.datasets.voc import convert_voc, parse_splits

    try:
        report = convert_voc(args.src, args.dst, parse_splits(args.splits), args.seed)
    except (ValueError, FileExistsError, NotADirectoryError) as error:  # --splits, src, dst, nothing to convert
        return _fail("convert-voc", str(error))
    print(report.format())
    return 0


def _dataset_arguments(args: argparse.Namespace):
    """(images root, metadata root, splits) from ROOT, --metadata, --splits (and --workers checked),
    or the message saying which argument is wrong."""
    from pathlib import Path

    root = Path(args.root)
    metadata = Path(args.metadata) if args.metadata else root / "metadata"
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not root.is_dir():
        return f"ROOT: {root} is not a folder; give the images root"
    if not metadata.is_dir():
        return f"--metadata: {metadata} is not a folder; give the folder holding train/ val/ test/"
    if not splits or any(s not in SPLIT_NAMES for s in splits):
        return f"--splits: {args.splits!r} is not allowed; names among {','.join(SPLIT_NAMES)}"
    if args.workers < 1:
        return f"--workers: {args.workers} is not allowed; an integer >= 1"
    return root, metadata, splits


def _check(args: argparse.Namespace) -> int:
    found = _dataset_arguments(args)
    if isinstance(found, str):
        return _fail("check", found)
    root, metadata, splits = found

    from trainers.datasets.check import DatasetError, check_dataset, require_clean

    report = check_dataset(root, metadata, splits, decode=not args.no_decode, workers=args.workers,
                           progress=_show_progress)
    print(report.format())
    try:
        _, message = require_clean(report, strict=not args.lenient)
    except DatasetError as error:
        print(error.hint, file=sys.stderr)
        return 1
    if report.problems:
        print(message, file=sys.stderr)
    return 0


def _cache(args: argparse.Namespace) -> int:
    found = _dataset_arguments(args)
    if isinstance(found, str):
        return _fail("cache", found)
    root, metadata, splits = found
    if not 8 <= args.crop_size <= args.resize_size:
        return _fail("cache", f"--crop-size {args.crop_size} / --resize-size {args.resize_size}: "
                              "need 8 <= crop size <= resize size")

    from trainers.datasets.cache import ImageCache, cache_folder, fill_cache, remove_stale_temporaries
    from trainers.datasets.check import check_dataset

    folder = cache_folder(args.cache_dir)
    try:
        ImageCache(folder).prepare()
    except OSError as error:
        return _fail("cache", f"--cache-dir: cannot write the image cache at {folder} ({error})")
    report = check_dataset(root, metadata, splits, decode=False)
    if report.problems:
        print(f"{report.summary()}: those images are left out (`{PROG} check {root}` lists them)", file=sys.stderr)
    jobs = sorted({(str(root / record.image_id), args.resize_size, args.resize) if split == "train"
                   else (str(root / record.image_id), args.crop_size, "square")
                   for split in report.splits for record in report.records(split)})
    stale = remove_stale_temporaries(folder)
    results = fill_cache(folder, jobs, args.workers, progress=lambda done, total: _show_progress(done, total, "caching"))
    failed = sorted(f"{path}: {found}" for (path, _, _), found in results.items() if isinstance(found, str))
    done = [found for found in results.values() if not isinstance(found, str)]
    counts = {kind: sum(k == kind for k, _ in done) for kind in ("decoded", "already there", "not kept")}
    if failed:
        print("\n".join(failed), file=sys.stderr)
    print(f"image cache {folder}: {len(jobs)} images of {', '.join(report.splits)}: {counts['decoded']} decoded "
          f"and kept, {counts['already there']} already there, {counts['not kept']} not kept, {len(failed)} "
          f"failed; {sum(size for kind, size in done if kind != 'not kept') / 2**20:.1f} MiB for this dataset"
          + (f"; {stale} stale temporaries removed" if stale else ""))
    if counts["not kept"]:
        print(f"{counts['not kept']} images not kept: the disk of {folder} is (nearly) full or not writable "
              "(the lines above say which); training decodes them each time", file=sys.stderr)
    return 1 if failed or counts["not kept"] else 0


def _show_progress(done: int, total: int, doing: str = "decoding") -> None:
    print(f"\r{doing} {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
