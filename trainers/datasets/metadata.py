"""Reading one split of the wsolevaluation metadata layout, collecting every problem on the way.

`<metadata_root>/<split>/` holds `image_ids.txt` (`<path>`), `class_labels.txt` (`<path>,<label>`),
`image_sizes.txt` (`<path>,<width>,<height>`) and `localization.txt`: boxes `<path>,<x0>,<y0>,<x1>,<y1>`
(one line per box) or OpenImages masks `<path>,<mask_png>,<ignore_png>` (one line per instance, the
ignore mask on an image's first line only). Paths are relative to the images root. A problem never
stops the reading: it is recorded with its file and line, and the image it concerns is left out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

IMAGE_IDS = "image_ids.txt"
CLASS_LABELS = "class_labels.txt"
IMAGE_SIZES = "image_sizes.txt"
LOCALIZATION = "localization.txt"
SPLITS = ("train", "val", "test")
EVALUATED_SPLITS = ("val", "test")  # need boxes or masks; train is weakly supervised

Box = tuple[int, int, int, int]

_INT = re.compile(r"\s*[+-]?[0-9]+\s*")
_BOX_FIELDS = "<path>,<x0>,<y0>,<x1>,<y1>"
_MASK_FIELDS = "<path>,<mask_png>,<ignore_png>"


@dataclass(frozen=True)
class ImageRecord:
    """One good image of a split: its label, size and boxes (original pixels) or instance masks."""

    image_id: str  # path relative to the images root
    label: int
    size: tuple[int, int] | None  # (width, height); None when the split has no image_sizes.txt
    boxes: tuple[Box, ...] = ()  # x0, y0, x1, y1 as written in localization.txt
    mask_paths: tuple[str, ...] = ()  # OpenImages instance masks, relative to the images root
    ignore_path: str | None = None


@dataclass(frozen=True)
class Problem:
    """Something wrong in a metadata file: the file, the 1-based line (0: the whole file) and what."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class SplitMetadata:
    """The good records of one split in image_ids.txt order, every problem, the ids left out."""

    split: str
    records: tuple[ImageRecord, ...]
    problems: tuple[Problem, ...] = ()
    bad_ids: frozenset[str] = field(default_factory=frozenset)

    @property
    def image_count(self) -> int:
        """Distinct images listed in image_ids.txt, good and bad."""
        return len(self.records) + len(self.bad_ids)


def read_split(
    metadata_root: str | Path, split: str, images_root: str | Path | None = None, check_files: bool = True
) -> SplitMetadata:
    """Parse the metadata files of `split`; every problem is collected, bad images are left out."""
    return _SplitReader(Path(metadata_root), split, images_root, check_files).read()


def first_lines(path: str | Path) -> dict[str, int]:
    """The 1-based line of each image id's first appearance in a metadata file (first field)."""
    lines, _ = _read_lines(Path(path))
    found: dict[str, int] = {}
    for number, text in lines:
        found.setdefault(text.split(",")[0], number)
    return found


def _read_lines(path: Path) -> tuple[list[tuple[int, str]], list[Problem]]:
    """Non-blank lines with their numbers; any line ending, a UTF-8 BOM, undecodable lines as problems."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # Windows editors write a BOM that is not part of the first path
        data = data[3:]
    lines, problems = [], []
    for number, raw in enumerate(data.splitlines(), start=1):  # bytes.splitlines: \n, \r\n and \r only
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append(Problem(str(path), number, f"not UTF-8 text ({error.reason} at byte {error.start}); "
                                                       "save the file as UTF-8"))
            continue
        if text.strip():
            lines.append((number, text))
    return lines, problems


def _to_int(text: str) -> int | None:
    return int(text) if _INT.fullmatch(text) else None


def _is_absolute(path: str) -> bool:
    return PurePosixPath(path).is_absolute() or PureWindowsPath(path).is_absolute()


class _SplitReader:
    """The state of reading one split: what each file said about each image id, and the problems."""

    def __init__(self, metadata_root: Path, split: str, images_root: str | Path | None, check_files: bool) -> None:
        self.folder = metadata_root / split
        self.split = split
        self.images_root = Path(images_root) if images_root is not None and check_files else None
        self.problems: list[Problem] = []
        self.bad: set[str] = set()
        self.id_line: dict[str, int] = {}  # image id -> its line in image_ids.txt, in file order
        self.labels: dict[str, int] = {}
        self.sizes: dict[str, tuple[int, int]] = {}
        self.boxes: dict[str, list[Box]] = {}
        self.masks: dict[str, list[str]] = {}
        self.ignores: dict[str, str | None] = {}
        self.seen: dict[str, set[str]] = {}  # file -> ids named on any of its lines

    def problem(self, name: str, line: int, message: str, image_id: str | None = None) -> None:
        self.problems.append(Problem(str(self.folder / name), line, message))
        if image_id in self.id_line:
            self.bad.add(image_id)

    def lines(self, name: str) -> list[tuple[int, str]] | None:
        path = self.folder / name
        if not path.is_file():
            return None
        lines, problems = _read_lines(path)
        self.problems.extend(problems)
        self.seen[name] = {text.split(",")[0] for _, text in lines}  # even from malformed lines
        return lines

    def read(self) -> SplitMetadata:
        if not self.read_image_ids():
            return self.result()
        self.read_labels()
        has_sizes = self.read_sizes()
        has_localization = self.read_localization()
        for image_id, line in self.id_line.items():
            if has_sizes and image_id not in self.seen[IMAGE_SIZES]:
                self.problem(IMAGE_IDS, line, f"image {image_id!r} has no line in {IMAGE_SIZES}", image_id)
            # train may lack boxes (weak supervision); val and test are evaluated on them
            if has_localization and self.split in EVALUATED_SPLITS and image_id not in self.seen[LOCALIZATION]:
                self.problem(IMAGE_IDS, line, f"image {image_id!r} has no line in {LOCALIZATION}; "
                                              f"{self.split} images need boxes or masks", image_id)
        return self.result()

    def result(self) -> SplitMetadata:
        records = tuple(
            ImageRecord(image_id, self.labels[image_id], self.sizes.get(image_id), tuple(self.boxes.get(image_id, ())),
                        tuple(self.masks.get(image_id, ())), self.ignores.get(image_id))
            for image_id in self.id_line if image_id not in self.bad
        )
        # by file, then line; problems of one line keep the order they were found in
        problems = tuple(sorted(self.problems, key=lambda p: (p.file, p.line)))
        return SplitMetadata(self.split, records, problems, frozenset(self.bad))

    def read_image_ids(self) -> bool:
        lines = self.lines(IMAGE_IDS)
        if lines is None:
            where = "" if self.folder.is_dir() else f" (no folder {self.folder})"
            self.problem(IMAGE_IDS, 0, f"missing{where}; every split needs {IMAGE_IDS}, one image path per line")
            return False
        for number, image_id in lines:
            if "," in image_id:
                self.problem(IMAGE_IDS, number, f"{image_id!r} has a comma; one path per line, "
                                                "paths may contain spaces but not commas")
            elif image_id in self.id_line:
                first = self.id_line[image_id]
                self.problem(IMAGE_IDS, number, f"duplicate image {image_id!r} (first on line {first})", image_id)
            else:
                self.id_line[image_id] = number
                self.check_image_file(number, image_id)
        return True

    def check_image_file(self, number: int, image_id: str) -> None:
        if _is_absolute(image_id):
            self.problem(IMAGE_IDS, number, f"image path {image_id!r} is absolute; paths are relative to "
                                            "the images root", image_id)
        elif self.images_root is not None and not (self.images_root / image_id).is_file():
            self.problem(IMAGE_IDS, number, f"image file not found: {self.images_root / image_id}", image_id)

    def fields(self, name: str, number: int, text: str, count: int, form: str) -> list[str] | None:
        fields = text.split(",")
        if len(fields) != count:
            self.problem(name, number, f"expected {count} fields {form}, got {len(fields)}", fields[0])
            return None
        if fields[0] not in self.id_line:
            self.problem(name, number, f"image {fields[0]!r} is not in {IMAGE_IDS}")
            return None
        return fields

    def read_labels(self) -> None:
        lines = self.lines(CLASS_LABELS)
        if lines is None:
            self.bad.update(self.id_line)
            self.problem(CLASS_LABELS, 0, f"missing; every split needs {CLASS_LABELS}, lines <path>,<label>")
            return
        first: dict[str, int] = {}
        for number, text in lines:
            image_id = text.split(",")[0]
            if image_id in first and image_id in self.id_line:
                self.problem(CLASS_LABELS, number,
                             f"duplicate label for {image_id!r} (first on line {first[image_id]})", image_id)
                continue
            first.setdefault(image_id, number)
            fields = self.fields(CLASS_LABELS, number, text, 2, "<path>,<label>")
            if fields is None:
                continue
            label = _to_int(fields[1])
            if label is None:
                self.problem(CLASS_LABELS, number, f"label {fields[1]!r} is not an integer", image_id)
            elif label < 0:
                self.problem(CLASS_LABELS, number, f"label {label} is negative; labels are integers from 0", image_id)
            else:
                self.labels[image_id] = label
        for image_id, line in self.id_line.items():
            if image_id not in self.seen[CLASS_LABELS]:
                self.problem(IMAGE_IDS, line, f"image {image_id!r} has no line in {CLASS_LABELS}", image_id)

    def read_sizes(self) -> bool:
        lines = self.lines(IMAGE_SIZES)
        if lines is None:
            if self.split in EVALUATED_SPLITS:  # boxes are rescaled from the original size to be evaluated
                self.bad.update(self.id_line)
                self.problem(IMAGE_SIZES, 0,
                             f"missing; {self.split} needs {IMAGE_SIZES}, lines <path>,<width>,<height>")
            return False
        first: dict[str, int] = {}
        for number, text in lines:
            image_id = text.split(",")[0]
            if image_id in first and image_id in self.id_line:
                self.problem(IMAGE_SIZES, number, f"duplicate size for {image_id!r} (first on line {first[image_id]})",
                             image_id)
                continue
            first.setdefault(image_id, number)
            fields = self.fields(IMAGE_SIZES, number, text, 3, "<path>,<width>,<height>")
            if fields is None:
                continue
            width, height = _to_int(fields[1]), _to_int(fields[2])
            if width is None or height is None or width < 1 or height < 1:
                self.problem(IMAGE_SIZES, number, f"size {fields[1]!r} x {fields[2]!r} is not allowed; "
                                                  "width and height are integers >= 1", image_id)
            else:
                self.sizes[image_id] = (width, height)
        return True

    def read_localization(self) -> bool:
        lines = self.lines(LOCALIZATION)
        if lines is None:
            if self.split in EVALUATED_SPLITS:
                self.bad.update(self.id_line)
                self.problem(LOCALIZATION, 0, f"missing; {self.split} needs boxes {_BOX_FIELDS} "
                                              f"or masks {_MASK_FIELDS} to be evaluated")
            return False
        kind: tuple[int, int] | None = None  # (field count, line) of the first well-formed line
        for number, text in lines:
            fields = text.split(",")
            if len(fields) not in (3, 5):
                self.problem(LOCALIZATION, number, f"expected 5 fields {_BOX_FIELDS} or 3 fields {_MASK_FIELDS}, "
                                                   f"got {len(fields)}", fields[0])
                continue
            if kind is None:
                kind = (len(fields), number)
            elif kind[0] != len(fields):
                found, first = ("a mask", "boxes") if len(fields) == 3 else ("a box", "masks")
                self.problem(LOCALIZATION, number, f"{found} line in a file of {first} (line {kind[1]}); "
                                                   "one kind per file", fields[0])
                continue
            if fields[0] not in self.id_line:
                self.problem(LOCALIZATION, number, f"image {fields[0]!r} is not in {IMAGE_IDS}")
            elif len(fields) == 5:
                self.read_box(number, fields)
            else:
                self.read_mask(number, fields)
        return True

    def read_box(self, number: int, fields: list[str]) -> None:
        image_id = fields[0]
        values = [_to_int(v) for v in fields[1:]]
        for name, raw, value in zip(("x0", "y0", "x1", "y1"), fields[1:], values):
            if value is None:
                self.problem(LOCALIZATION, number, f"box {name} {raw!r} is not an integer", image_id)
                return
        x0, y0, x1, y1 = box = tuple(values)
        reversed_ = [f"{b} < {a}" for a, b, lo, hi in (("x0", "x1", x0, x1), ("y0", "y1", y0, y1)) if hi < lo]
        if reversed_:
            self.problem(LOCALIZATION, number, f"box {box} has {' and '.join(reversed_)}; "
                                               "boxes are x0,y0,x1,y1 with x0 <= x1, y0 <= y1", image_id)
            return
        size = self.sizes.get(image_id)
        # boxes may touch the far edge: VOC-style inclusive boxes reach x1 == width
        if min(x0, y0) < 0 or (size is not None and (x1 > size[0] or y1 > size[1])):
            within = f"the {size[0]}x{size[1]} image" if size else "the image"
            limits = f"0 <= x <= {size[0]}, 0 <= y <= {size[1]}" if size else "coordinates >= 0"
            self.problem(LOCALIZATION, number, f"box {box} is outside {within}; allowed {limits}", image_id)
            return
        self.boxes.setdefault(image_id, []).append(box)

    def read_mask(self, number: int, fields: list[str]) -> None:
        image_id, mask, ignore = fields
        first = image_id not in self.masks
        masks = self.masks.setdefault(image_id, [])
        if first:
            self.ignores[image_id] = ignore or None
        elif ignore:
            self.problem(LOCALIZATION, number, f"ignore mask {ignore!r} on a later line of {image_id!r}; "
                                               "only an image's first line may name one", image_id)
        if not mask:
            self.problem(LOCALIZATION, number, f"empty mask path for {image_id!r}", image_id)
            return
        masks.append(mask)
        for path in (mask, ignore if first else ""):
            if path and self.images_root is not None and not (self.images_root / path).is_file():
                self.problem(LOCALIZATION, number, f"mask file not found: {self.images_root / path}", image_id)
