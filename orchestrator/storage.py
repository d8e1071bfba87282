"""The sweep's storage root: a local folder or a pyarrow filesystem URI (s3://bucket/prefix, with
optional ?endpoint_override=...&scheme=http for S3-compatible servers), seen the same way by the
driver, Tune, Ray Train and the pre-launch checks."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def is_uri(root: str) -> bool:
    return "://" in root


def open_filesystem(root: str):
    """(pyarrow filesystem, its path for `root`) for a URI or a local folder."""
    import pyarrow.fs as pafs

    if is_uri(root):
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), str(Path(root).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """A filesystem path below `base` (pyarrow paths use '/')."""
    return "/".join([base.rstrip("/"), *parts])


def child_uri(root: str, name: str) -> str:
    """`root`/`name`, keeping a URI's query (its endpoint options) at the end where pyarrow reads it."""
    if not is_uri(root):
        return str(Path(root) / name)
    parts = urlsplit(root)
    return urlunsplit(parts._replace(path=join(parts.path, name)))


def exists(root: str, name: str) -> bool:
    import pyarrow.fs as pafs

    filesystem, base = open_filesystem(root)
    return filesystem.get_file_info(join(base, name)).type != pafs.FileType.NotFound


def write_text(root: str, relative: str, text: str) -> None:
    """Write a small file under the root whole (a local file through a temporary name and a rename)."""
    filesystem, base = open_filesystem(root)
    path = join(base, relative)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if is_uri(root):  # an object store writes an object whole or not at all
        with filesystem.open_output_stream(path) as stream:
            stream.write(text.encode())
        return
    temporary = Path(path).with_name(f".{Path(path).name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def read_text(root: str, relative: str) -> str:
    """The text of a file under the root; FileNotFoundError when it is not there."""
    filesystem, base = open_filesystem(root)
    try:
        with filesystem.open_input_stream(join(base, relative)) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        raise
    except OSError as error:  # pyarrow's S3 "not found" is an OSError
        if "not found" in str(error).lower() or "does not exist" in str(error).lower():
            raise FileNotFoundError(join(base, relative)) from None
        raise


def copy(source: str, target: str) -> int:
    """Copy a file or a folder between any two of: a local path, s3://..., gs://... (pyarrow's
    filesystems, the ones the cluster's image has); returns the number of files copied."""
    import pyarrow.fs as pafs

    src_fs, src = open_filesystem(source)
    dst_fs, dst = open_filesystem(target)
    info = src_fs.get_file_info(src)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{source}: no such file or folder")
    if info.type == pafs.FileType.File:
        dst_fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
        return 1
    files = [i for i in src_fs.get_file_info(pafs.FileSelector(src, recursive=True)) if i.type == pafs.FileType.File]
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs, use_threads=True)
    return len(files)


def backup_sqlite(database: str, target: str) -> None:
    """A consistent copy of a live sqlite database (the MLflow store) to `target`, a path or URI."""
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        snapshot = Path(folder) / Path(database).name
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as live, sqlite3.connect(snapshot) as out:
            live.backup(out)
        copy(str(snapshot), target)


def main(argv: list[str] | None = None) -> int:
    """python -m orchestrator.storage copy SRC DST | backup-sqlite DB DST: with only what the image has."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m orchestrator.storage", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    copying = commands.add_parser("copy", help="a file or folder between local paths and s3:// / gs:// URIs")
    copying.add_argument("source")
    copying.add_argument("target")
    backup = commands.add_parser("backup-sqlite", help="a consistent copy of a live sqlite database")
    backup.add_argument("database")
    backup.add_argument("target")
    args = parser.parse_args(argv)
    try:
        if args.command == "copy":
            print(f"{copy(args.source, args.target)} file(s) copied from {args.source} to {args.target}")
        else:
            backup_sqlite(args.database, args.target)
            print(f"{args.database} backed up to {args.target}")
    except (OSError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
