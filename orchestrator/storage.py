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
