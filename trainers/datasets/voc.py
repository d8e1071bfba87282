"""Pascal VOC style folders (images + XML, one class per image) into the wsolevaluation layout.

Output, under `dst`: `images/<class>/<file>` (copied bytes, never re-encoded), `classes.txt` (one
name per line, in label order) and `metadata/{train,val,test}/` with image_ids, class_labels,
image_sizes and localization. Image ids are relative to `dst`, so `dst` is the images root and
`dst/metadata` the metadata root (`python -m trainers.datasets check DST` checks it).
Every image left out or changed is reported with its source file and the reason.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

from trainers.datasets.check import decode_image_size

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
# VOC coordinates are 1-based and inclusive, and annotation tools round: a box may reach 1-2 px past
# the image. That much is clipped; more means the box belongs to another image or size, and is dropped.
BOX_SLACK = 2
_SPLITS_ALLOWED = "allowed: 3 non-negative fractions train,val,test that sum to 1, e.g. 0.7,0.1,0.2"

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Note:
    """One source item skipped or fixed: the file (relative to src) and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass(frozen=True)
class ConversionReport:
    """Images converted per split and class, and every item skipped or fixed, with its reason."""

    src: str
    dst: str
    classes: tuple[str, ...]
    counts: Mapping[str, Mapping[str, int]]  # split -> class -> images
    skipped: tuple[Note, ...] = ()
    fixed: tuple[Note, ...] = ()
    splits: tuple[float, float, float] = (0.7, 0.1, 0.2)
    seed: int = 0

    @property
    def converted(self) -> int:
        """Images written, over all splits."""
        return sum(sum(per_class.values()) for per_class in self.counts.values())

    def format(self) -> str:
        """A table of counts per class and split, then every skipped and fixed item."""
        fractions = ",".join(f"{f:g}" for f in self.splits)
        lines = [f"converted {self.converted} images of {len(self.classes)} classes from {self.src} into {self.dst} "
                 f"(splits {fractions}, seed {self.seed})"]
        width = max([len("class"), len("total"), *map(len, self.classes)])
        lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>5}" for s in (*SPLITS, "total")))
        for name in (*self.classes, None):
            row = [self.counts[s].get(name, 0) if name else sum(self.counts[s].values()) for s in SPLITS]
            lines.append(f"{name or 'total':<{width}}  " + "  ".join(f"{n:>5}" for n in (*row, sum(row))))
        lines.append(f"skipped {len(self.skipped)}" + (":" if self.skipped else ""))
        lines.extend(f"  {note}" for note in self.skipped)
        lines.append(f"fixed {len(self.fixed)}" + (":" if self.fixed else ""))
        lines.extend(f"  {note}" for note in self.fixed)
        return "\n".join(lines)


def validate_splits(splits: object) -> tuple[float, float, float]:
    """(train, val, test) fractions: 3 finite numbers >= 0 summing to 1 within 1e-6."""
    try:
        values = tuple(float(f) for f in splits)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or abs(sum(values) - 1) > 1e-6:
        shown = ",".join(map(str, splits)) if isinstance(splits, (tuple, list)) else repr(splits)
        raise ValueError(f"--splits: {shown} is not allowed; {_SPLITS_ALLOWED}")
    return values  # type: ignore[return-value]


def parse_splits(text: str) -> tuple[float, float, float]:
    """Fractions from the command line form `0.7,0.1,0.2`."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--splits: {text!r} is not allowed; {_SPLITS_ALLOWED}") from None
    return validate_splits(values)


@dataclass
class _Item:
    """One convertible image: where it is, what it shows, and its output name."""

    image: Path
    source: str  # the image relative to src
    class_name: str
    size: tuple[int, int]
    boxes: list[Box]
    name: str = ""  # file name under images/<class>/
    split: str = ""


@dataclass
class _Conversion:
    """The state of one conversion: the scanned tree, the items found, the notes."""

    src: Path
    images: list[Path] = field(default_factory=list)
    xmls: list[Path] = field(default_factory=list)
    by_name: dict[str, list[Path]] = field(default_factory=dict)  # file name -> images
    by_stem: dict[str, list[Path]] = field(default_factory=dict)
    claimed: dict[Path, str] = field(default_factory=dict)  # image -> the XML that named it
    items: list[_Item] = field(default_factory=list)
    skipped: list[Note] = field(default_factory=list)
    fixed: list[Note] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.src).as_posix()


def convert_voc(
    src: str | Path,
    dst: str | Path,
    splits: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> ConversionReport:
    """Convert a VOC style folder into the wsolevaluation layout at `dst`, a new or empty folder."""
    fractions = validate_splits(splits)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise NotADirectoryError(f"src: {src} is not a folder; give the folder that holds the images and XMLs")
    _refuse_non_empty(dst)
    if classes is not None:
        classes = tuple(classes)
        if len(set(classes)) != len(classes) or not all(_class_name_problem(c) is None for c in classes):
            raise ValueError(f"classes: {classes!r} is not allowed; distinct names usable as folder names")
    state = _Conversion(src)
    _scan(state)
    for xml in state.xmls:
        _read_item(state, xml)
    for image in state.images:
        if image not in state.claimed:
            state.skipped.append(Note(state.rel(image), "no XML annotation names this image"))
    names = tuple(classes) if classes is not None else tuple(sorted({item.class_name for item in state.items}))
    state.skipped.extend(Note(i.source, f"class {i.class_name!r} is not among the classes given")
                         for i in state.items if i.class_name not in names)
    state.items = [i for i in state.items if i.class_name in names]
    if not state.items:
        notes = "\n".join(f"  {note}" for note in state.skipped) or "  (no images or XML files found)"
        raise ValueError(f"src: nothing to convert in {src}; every image was skipped:\n{notes}")
    _assign_splits(state.items, names, fractions, seed)
    _name_outputs(state)
    _write(state, names, dst)
    counts = {s: {c: sum(1 for i in state.items if i.split == s and i.class_name == c) for c in names} for s in SPLITS}
    return ConversionReport(str(src), str(dst), names, counts, tuple(state.skipped), tuple(state.fixed),
                            fractions, seed)


def _refuse_non_empty(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"dst: {dst} exists and is not an empty folder; convert-voc writes only into a new "
                              "or empty folder, so nothing you made is lost: give another dst or remove it yourself")


def _scan(state: _Conversion) -> None:
    """Every image and XML under src, in sorted order, hidden folders (.git, ...) left out."""
    for folder, subfolders, files in os.walk(state.src):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            suffix = path.suffix.lower()
            if suffix == ".xml":
                state.xmls.append(path)
            elif suffix in IMAGE_SUFFIXES:
                state.images.append(path)
                state.by_name.setdefault(path.name, []).append(path)
                state.by_stem.setdefault(path.stem, []).append(path)


def _match_image(state: _Conversion, xml: Path, filename: str | None) -> Path | str:
    """The image of an XML: by its <filename> (never its <path>), else by the XML's own stem; or why not."""
    candidates = (state.by_name.get(filename, []) if filename else []) or state.by_stem.get(xml.stem, [])
    if not candidates:
        named = f"{filename!r} (its <filename>) or " if filename else ""
        return f"no image named {named}{xml.stem}.* under src"
    # Same name in several folders: the one whose path shares most with the XML's
    # (raccoon-annotations/ goes with raccoon-images/).
    rel = state.rel(xml)
    scores = [len(os.path.commonprefix([rel, state.rel(p)])) for p in candidates]
    best = [p for p, s in zip(candidates, scores) if s == max(scores)]
    if len(best) > 1:
        return f"ambiguous: several images match: {', '.join(state.rel(p) for p in best)}"
    return best[0]


def _read_item(state: _Conversion, xml: Path) -> None:
    source = state.rel(xml)
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError) as error:
        state.skipped.append(Note(source, f"not a readable XML annotation ({error})"))
        return
    filename_text = (root.findtext("filename") or "").strip()
    filename = PureWindowsPath(filename_text).name if filename_text else None  # handles / and \ alike
    image = _match_image(state, xml, filename)
    if isinstance(image, str):
        state.skipped.append(Note(source, image))
        return
    if image in state.claimed:
        state.skipped.append(Note(source, f"its image {state.rel(image)} is already annotated by "
                                          f"{state.claimed[image]}"))
        return
    state.claimed[image] = source
    objects = root.findall("object")
    names = sorted({(o.findtext("name") or "").strip() for o in objects})
    if not objects:
        state.skipped.append(Note(source, "no <object>: nothing to label or localize"))
        return
    if len(names) > 1:
        state.skipped.append(Note(source, f"names several classes ({', '.join(map(repr, names))}); "
                                          "one class per image is needed for the image label"))
        return
    problem = _class_name_problem(names[0])
    if problem:
        state.skipped.append(Note(source, problem))
        return
    try:
        size = decode_image_size(image)
    except Exception as error:  # unreadable or truncated: a finding about the file
        state.skipped.append(Note(state.rel(image), f"cannot decode the image ({error or type(error).__name__}); "
                                                    f"annotated by {source}"))
        return
    _check_xml_size(state, source, root, size)
    boxes = [box for index, obj in enumerate(objects, 1) if (box := _read_box(state, source, index, obj, size))]
    if not boxes:
        state.skipped.append(Note(source, f"no usable box (all {len(objects)} dropped, see fixed)"))
        return
    state.items.append(_Item(image, state.rel(image), names[0], size, boxes))


def _class_name_problem(name: str) -> str | None:
    if not name:
        return "an <object> has an empty <name>"
    if name in (".", "..") or any(c in name for c in "/\\,\n\r"):
        return f"class name {name!r} cannot be a folder name and a metadata field: no / \\ , or newline, not . or .."
    return None


def _check_xml_size(state: _Conversion, source: str, root: ET.Element, size: tuple[int, int]) -> None:
    """Warn when the XML's <size> disagrees with the decoded image (the decoded size is used)."""
    written = [(root.findtext(f"size/{key}") or "").strip() for key in ("width", "height")]
    try:
        agrees = [float(v) for v in written] == [float(v) for v in size]
    except ValueError:
        agrees = False
    if not agrees:
        shown = "x".join(v or "?" for v in written)
        state.fixed.append(Note(source, f"<size> {shown} differs from the decoded image "
                                        f"{size[0]}x{size[1]}; the decoded size is used"))


def _read_box(state: _Conversion, source: str, index: int, obj: ET.Element, size: tuple[int, int]) -> Box | None:
    """The object's box as written in the XML, clipped by at most BOX_SLACK px; None (noted) when unusable."""
    # Stored as in the XML (VOC: 1-based, inclusive), only clipped: wsolevaluation's own CUB and
    # ILSVRC metadata also store the raw annotation coordinates, and its evaluation treats them alike.
    raw = [obj.findtext(f"bndbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")]
    where = f"object {index}"
    try:
        values = [float(v) for v in raw]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        state.fixed.append(Note(source, f"{where}: <bndbox> {raw} is not 4 numbers xmin,ymin,xmax,ymax; box dropped"))
        return None
    box = tuple(round(v) for v in values)
    if any(v != int(v) for v in values):
        state.fixed.append(Note(source, f"{where}: box {tuple(raw)} rounded to integers {box}"))
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        state.fixed.append(Note(source, f"{where}: box {box} has xmax < xmin or ymax < ymin; box dropped"))
        return None
    width, height = size
    beyond = max(-x0, -y0, x1 - width, y1 - height)
    if beyond > BOX_SLACK:
        state.fixed.append(Note(source, f"{where}: box {box} lies {beyond} px outside the {width}x{height} image; "
                                        "box dropped"))
        return None
    if beyond > 0:
        clipped = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
        state.fixed.append(Note(source, f"{where}: box {box} exceeds the {width}x{height} image by {beyond} px "
                                        f"(VOC 1-based coordinates); clipped to {clipped}"))
        box = clipped
    return box  # type: ignore[return-value]


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Images of one class per split: largest remainders, and one each when the class has >= 3."""
    exact = [f * n for f in fractions]
    counts = [math.floor(e + 1e-9) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if n >= 3:  # every split that has a share gets at least one image of the class
        for i, fraction in enumerate(fractions):
            if fraction > 0 and counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _assign_splits(items: list[_Item], classes: Sequence[str], fractions: Sequence[float], seed: int) -> None:
    """Stratified: each class shuffled with one seeded generator, cut by `split_counts`."""
    rng = random.Random(seed)
    for name in classes:
        members = sorted((i for i in items if i.class_name == name), key=lambda i: i.source)
        rng.shuffle(members)
        start = 0
        for split, count in zip(SPLITS, split_counts(len(members), fractions)):
            for item in members[start:start + count]:
                item.split = split
            start += count


def _name_outputs(state: _Conversion) -> None:
    """Output file names: the source name, commas replaced, made unique within the class folder."""
    taken: set[tuple[str, str]] = set()
    for item in sorted(state.items, key=lambda i: i.source):
        name = item.image.name.replace(",", "_")  # the metadata is comma separated
        stem, suffix = os.path.splitext(name)
        candidate, k = name, 1
        while (item.class_name, candidate) in taken:
            k += 1
            candidate = f"{stem}-{k}{suffix}"
        if candidate != item.image.name:
            state.fixed.append(Note(item.source, f"written as images/{item.class_name}/{candidate} "
                                                 "(a comma, or the name taken by another image of the class)"))
        taken.add((item.class_name, candidate))
        item.name = candidate


def _write(state: _Conversion, classes: Sequence[str], dst: Path) -> None:
    """Everything into a temporary sibling of dst, renamed at the end: a crash leaves no half dst."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        labels = {name: label for label, name in enumerate(classes)}
        for item in state.items:
            target = tmp / "images" / item.class_name / item.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.image, target)  # the bytes as they are: no re-encoding
        for split in SPLITS:
            members = sorted((i for i in state.items if i.split == split), key=_image_id)
            folder = tmp / "metadata" / split
            folder.mkdir(parents=True)
            _write_lines(folder / "image_ids.txt", [_image_id(i) for i in members])
            _write_lines(folder / "class_labels.txt", [f"{_image_id(i)},{labels[i.class_name]}" for i in members])
            _write_lines(folder / "image_sizes.txt", [f"{_image_id(i)},{i.size[0]},{i.size[1]}" for i in members])
            _write_lines(folder / "localization.txt",
                         [f"{_image_id(i)},{x0},{y0},{x1},{y1}" for i in members for x0, y0, x1, y1 in i.boxes])
        _write_lines(tmp / "classes.txt", list(classes))
        _refuse_non_empty(dst)  # again: something may have appeared there while we worked
        if dst.exists():
            dst.rmdir()  # empty: renaming onto it is not portable
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _image_id(item: _Item) -> str:
    return f"images/{item.class_name}/{item.name}"


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
