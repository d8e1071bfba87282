"""The dataset check: every metadata problem of every split, and every image that does not decode.

Decoding runs in a spawn process pool (forking a parent that runs threads, as torch does, can hang);
a decoded size that differs from image_sizes.txt is a problem on that line. `require_clean` turns
a report into a stop (strict, listing every bad line) or into records without the bad images.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from trainers.datasets.metadata import (
    IMAGE_IDS, IMAGE_SIZES, SPLITS, ImageRecord, Problem, SplitMetadata, first_lines, read_split,
)


Progress = Callable[[int, int], None]  # (images decoded so far, images to decode)


class DatasetError(ValueError):
    """A dataset with problems, in strict mode; the message lists every bad line and how to proceed."""

    def __init__(self, message: str, report: CheckReport | None = None, hint: str = "") -> None:
        super().__init__(message, report, hint)  # all in args: the error pickles (Ray ships errors)
        self.report, self.hint = report, hint

    def __str__(self) -> str:  # ValueError would print the tuple of its arguments
        return str(self.args[0])


@dataclass(frozen=True)
class CheckReport:
    """What check_dataset found: each split's metadata (good records only), every problem, counts."""

    images_root: str
    metadata_root: str
    splits: Mapping[str, SplitMetadata]
    missing_splits: tuple[str, ...] = ()  # requested, but without a folder under metadata_root
    other_problems: tuple[Problem, ...] = ()  # about no split in particular
    decoded: int = 0  # images decoded (0 with decode=False)

    @property
    def problems(self) -> tuple[Problem, ...]:
        """Every problem, split by split."""
        return self.other_problems + tuple(p for meta in self.splits.values() for p in meta.problems)

    @property
    def bad_images(self) -> int:
        """Images left out because of a problem, over all splits."""
        return sum(len(meta.bad_ids) for meta in self.splits.values())

    @property
    def total_images(self) -> int:
        """Images listed in the image_ids.txt files, over all splits."""
        return sum(meta.image_count for meta in self.splits.values())

    def records(self, split: str) -> tuple[ImageRecord, ...]:
        """The good records of one split."""
        return self.splits[split].records

    def summary(self) -> str:
        """One line: `3 problems in 2 images of 364 (train 1, val 0, test 1)`."""
        per_split = ", ".join(f"{name} {len(meta.bad_ids)}" for name, meta in self.splits.items())
        return (f"{_plural(len(self.problems), 'problem')} in {_plural(self.bad_images, 'image')} "
                f"of {self.total_images}" + (f" ({per_split})" if per_split else ""))

    def format(self) -> str:
        """Every problem as `file:line: message`, then notes on unchecked splits, then the summary."""
        lines = [str(problem) for problem in self.problems]
        if self.missing_splits and self.splits:
            lines.append(f"not checked (no folder under {self.metadata_root}): {', '.join(self.missing_splits)}")
        lines.append(self.summary())
        return "\n".join(lines)


def check_dataset(
    images_root: str | Path,
    metadata_root: str | Path,
    splits: Sequence[str] = SPLITS,
    decode: bool = True,
    workers: int = 2,
    progress: Progress | None = None,
) -> CheckReport:
    """Read the metadata of each split present and, with `decode`, decode every good image."""
    images_root, metadata_root = Path(images_root), Path(metadata_root)
    present = [s for s in splits if (metadata_root / s).is_dir()]
    missing = tuple(s for s in splits if s not in present)
    other: tuple[Problem, ...] = ()
    if not present:
        other = (Problem(str(metadata_root), 0, f"no split folder ({', '.join(splits)}) here; "
                                                "expected <metadata>/<split>/image_ids.txt and friends"),)
    metas = {s: read_split(metadata_root, s, images_root, check_files=True) for s in present}
    decoded = 0
    if decode:
        paths = sorted({str(images_root / r.image_id) for meta in metas.values() for r in meta.records})
        sizes = decode_sizes(paths, workers, progress)
        metas = {s: _with_decoding(meta, metadata_root, images_root, sizes) for s, meta in metas.items()}
        decoded = len(paths)
    return CheckReport(str(images_root), str(metadata_root), metas, missing, other, decoded)


def require_clean(report: CheckReport, strict: bool = True) -> tuple[CheckReport, str]:
    """Strict: raise DatasetError on any problem. Lenient: the report and a one-line skip message."""
    if not report.problems:
        return report, f"{report.total_images} images, no problems"
    if strict:
        hint = (f"to proceed: fix the lines above, or run lenient (--lenient, strict=False) to skip "
                f"the {_plural(report.bad_images, 'image')} with problems")
        raise DatasetError(f"{report.format()}\n{hint}", report, hint)
    return report, (f"skipping {_plural(report.bad_images, 'image')} with problems "
                    f"({_plural(len(report.problems), 'problem')}; see `python -m trainers.datasets check "
                    f"{report.images_root} --metadata {report.metadata_root}`)")


def decode_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image decoded fully with PIL; raises on unreadable or truncated files."""
    from PIL import Image, ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # else PIL pads a truncated JPEG with grey and says nothing
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def decode_sizes(paths: Sequence[str], workers: int = 2, progress: Progress | None = None
                 ) -> dict[str, tuple[int, int] | str]:
    """Each path's decoded (width, height), or the error message when it does not decode."""
    return map_chunks(_decode_chunk, paths, workers, progress)


def map_chunks(function: Callable[[list], dict], items: Sequence, workers: int = 2,
               progress: Progress | None = None) -> dict:
    """The merged dicts of `function` (picklable: a list of items to a dict) over chunks of `items`,
    in `workers` spawn processes (1: in this one); `progress(done, total)` after each chunk."""
    results: dict = {}
    if not items:
        return results
    chunk = max(1, min(64, math.ceil(len(items) / (4 * max(1, workers)))))  # a few chunks per worker
    chunks = [list(items[i:i + chunk]) for i in range(0, len(items), chunk)]
    if workers <= 1:
        for part in chunks:
            results.update(function(part))
            if progress:
                progress(len(results), len(items))
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context) as pool:
        for future in as_completed([pool.submit(function, part) for part in chunks]):
            results.update(future.result())
            if progress:
                progress(len(results), len(items))
    return results


def _decode_chunk(paths: Iterable[str]) -> dict[str, tuple[int, int] | str]:
    results: dict[str, tuple[int, int] | str] = {}
    for path in paths:
        try:
            results[path] = decode_image_size(path)
        except Exception as error:  # any decoder failure is a finding about the file, not a crash
            results[path] = str(error) or type(error).__name__
    return results


def _with_decoding(meta: SplitMetadata, metadata_root: Path, images_root: Path,
                   sizes: Mapping[str, tuple[int, int] | str]) -> SplitMetadata:
    """The split with decode failures and size mismatches added as problems, those images left out."""
    folder = metadata_root / meta.split
    id_lines = size_lines = None  # read only when needed: clean splits cost nothing more
    problems, bad = list(meta.problems), set()
    for record in meta.records:
        found = sizes[str(images_root / record.image_id)]
        if isinstance(found, str):
            id_lines = id_lines if id_lines is not None else first_lines(folder / IMAGE_IDS)
            problems.append(Problem(str(folder / IMAGE_IDS), id_lines[record.image_id],
                                    f"cannot decode image {images_root / record.image_id}: {found}"))
            bad.add(record.image_id)
        elif record.size is not None and tuple(found) != record.size:
            size_lines = size_lines if size_lines is not None else first_lines(folder / IMAGE_SIZES)
            problems.append(Problem(str(folder / IMAGE_SIZES), size_lines[record.image_id],
                                    f"size {record.size[0]}x{record.size[1]} of {record.image_id!r} differs from "
                                    f"the decoded image, {found[0]}x{found[1]}"))
            bad.add(record.image_id)
    if not bad:
        return meta
    return replace(meta, records=tuple(r for r in meta.records if r.image_id not in bad),
                   problems=tuple(sorted(problems, key=lambda p: (p.file, p.line))),
                   bad_ids=meta.bad_ids | bad)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"
