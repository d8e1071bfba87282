"""`python -m trainers.datasets convert-voc SRC DST` and `python -m trainers.datasets check ROOT`.

Exit status: 0 done, 1 strict check with problems, 2 bad arguments (one line on stderr).
Imports of the tools happen inside the commands, so `--help` answers at once.
"""
from __future__ import annotations

import argparse
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
    commands = parser.add_subparsers(dest="command", required=True, metavar="{convert-voc,check}")
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


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    root = Path(args.root)
    metadata = Path(args.metadata) if args.metadata else root / "metadata"
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not root.is_dir():
        return _fail("check", f"ROOT: {root} is not a folder; give the images root")
    if not metadata.is_dir():
        return _fail("check", f"--metadata: {metadata} is not a folder; give the folder holding train/ val/ test/")
    if not splits or any(s not in SPLIT_NAMES for s in splits):
        return _fail("check", f"--splits: {args.splits!r} is not allowed; names among {','.join(SPLIT_NAMES)}")
    if args.workers < 1:
        return _fail("check", f"--workers: {args.workers} is not allowed; an integer >= 1")

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


def _show_progress(done: int, total: int) -> None:
    print(f"\rdecoding {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
