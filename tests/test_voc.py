"""Specification of the VOC converter: matching, skips and fixes with reasons, stratified seeded splits."""
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from trainers.datasets import voc
from trainers.datasets.check import check_dataset
from trainers.datasets.voc import convert_voc, split_counts, validate_splits

REPO = Path(__file__).resolve().parents[1]
VOC_ANIMALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc-animals"  # the team's photographs


def jpeg(path: Path, size=(20, 16), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = random.Random(seed).randbytes(size[0] * size[1] * 3)
    Image.frombytes("RGB", size, noise).save(path, "JPEG")
    return path


def annotation(path: Path, filename: str | None, objects, size=(20, 16), where="/home/gone/Desktop") -> None:
    """A VOC XML; objects: (name, (xmin, ymin, xmax, ymax)); `<path>` points to a machine that is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = ["<annotation>", "<folder>images</folder>"]
    if filename is not None:
        parts += [f"<filename>{filename}</filename>", f"<path>{where}/{filename}</path>"]
    parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x0, y0, x1, y1) in objects:
        parts.append(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    parts.append("</annotation>")
    path.write_text("\n".join(parts))


def fake_voc(src: Path) -> Path:
    """6 convertible cats, 6 convertible dogs, and one of each kind of mess."""
    cats, cat_xml = src / "cat-images", src / "cat-annotations"
    for k in range(1, 6):
        jpeg(cats / f"cat{k}.jpg", seed=k)
        annotation(cat_xml / f"cat{k}.xml", f"cat{k}.jpg", [("cat", (2, 3, 10, 12))])
    jpeg(cats / "cat6.jpg", seed=6)  # its XML has another name
    annotation(cat_xml / "ann-006.xml", "cat6.jpg", [("cat", (1, 1, 20, 16)), ("cat", (5, 5, 6, 6))])
    annotation(cat_xml / "cat7.xml", "cat7.jpg", [("cat", (2, 2, 5, 5))])  # no image
    jpeg(cats / "stray.jpg", seed=8)  # no XML
    dogs, dog_xml = src / "dogs" / "JPEGImages", src / "dogs" / "Annotations"
    for k in range(1, 3):
        jpeg(dogs / f"dog{k}.jpg", (24, 18), seed=10 + k)
        annotation(dog_xml / f"dog{k}.xml", f"dog{k}.jpg", [("dog", (1, 1, 24, 18))], size=(24, 18),
                   where="C:\\Users\\someone")
    jpeg(dogs / "dog4.jpg", (24, 18), seed=14)
    annotation(dog_xml / "dog4.xml", None, [("dog", (3, 3, 9, 9))], size=(0, 0))  # no <filename>, size 0
    truncated = jpeg(dogs / "dog5.jpg", (64, 48), seed=15)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    annotation(dog_xml / "dog5.xml", "dog5.jpg", [("dog", (1, 1, 5, 5))], size=(64, 48))
    jpeg(dogs / "dog6.jpg", (24, 18), seed=16)
    annotation(dog_xml / "dog6.xml", "dog6.jpg", [("dog", (1, 1, 5, 5)), ("cat", (6, 6, 9, 9))], size=(24, 18))
    jpeg(dogs / "dog7.jpg", (24, 18), seed=17)
    annotation(dog_xml / "dog7.xml", "dog7.jpg", [("dog", (2, 2, 25, 18))], size=(24, 18))  # 1 px too wide
    jpeg(dogs / "dog8.jpg", (24, 18), seed=18)
    annotation(dog_xml / "dog8.xml", "dog8.jpg", [("dog", (2, 2, 9, 9)), ("dog", (30, 2, 40, 9))], size=(24, 18))
    jpeg(dogs / "dog9.jpg", (24, 18), seed=19)
    annotation(dog_xml / "dog9.xml", "dog9.jpg", [("dog", (2, 2, 9, 9))], size=(18, 24))  # wrong <size>
    return src


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_fake_voc_converts_with_every_skip_and_fix_reported(tmp_path):
    src, dst = fake_voc(tmp_path / "src"), tmp_path / "out" / "animals"
    report = convert_voc(src, dst)

    assert report.classes == ("cat", "dog")
    # 6 per class: 4.2 / 0.6 / 1.2 -> largest remainders give 4 / 1 / 1
    assert report.counts == {"train": {"cat": 4, "dog": 4}, "val": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 1}}
    assert report.converted == 12
    skipped = [str(n) for n in report.skipped]
    assert skipped[0] == "cat-annotations/cat7.xml: no image named 'cat7.jpg' (its <filename>) or cat7.* under src"
    assert skipped[1].startswith("dogs/JPEGImages/dog5.jpg: cannot decode the image (")
    assert skipped[1].endswith("); annotated by dogs/Annotations/dog5.xml")
    assert skipped[2:] == [
        "dogs/Annotations/dog6.xml: names several classes ('cat', 'dog'); one class per image is needed "
        "for the image label",
        "cat-images/stray.jpg: no XML annotation names this image",
    ]
    assert [str(n) for n in report.fixed] == [
        "dogs/Annotations/dog4.xml: <size> 0x0 differs from the decoded image 24x18; the decoded size is used",
        "dogs/Annotations/dog7.xml: object 1: box (2, 2, 25, 18) exceeds the 24x18 image by 1 px "
        "(VOC 1-based coordinates); clipped to (2, 2, 24, 18)",
        "dogs/Annotations/dog8.xml: object 2: box (30, 2, 40, 9) lies 16 px outside the 24x18 image; box dropped",
        "dogs/Annotations/dog9.xml: <size> 18x24 differs from the decoded image 24x18; the decoded size is used",
    ]
    text = report.format()
    assert text.splitlines()[1:5] == [
        "class  train    val   test  total",
        "cat        4      1      1      6",
        "dog        4      1      1      6",
        "total      8      2      2     12",
    ]
    assert "skipped 4:" in text and "fixed 4:" in text

    # the layout, the bytes as they were, the boxes as in the XML after clipping
    assert read(dst / "classes.txt") == ["cat", "dog"]
    assert (dst / "images" / "cat" / "cat6.jpg").read_bytes() == (src / "cat-images" / "cat6.jpg").read_bytes()
    boxes = [line for s in ("train", "val", "test") for line in read(dst / "metadata" / s / "localization.txt")]
    assert "images/cat/cat6.jpg,1,1,20,16" in boxes and "images/cat/cat6.jpg,5,5,6,6" in boxes
    assert "images/dog/dog7.jpg,2,2,24,18" in boxes
    assert [b for b in boxes if b.startswith("images/dog/dog8.jpg")] == ["images/dog/dog8.jpg,2,2,9,9"]
    sizes = [line for s in ("train", "val", "test") for line in read(dst / "metadata" / s / "image_sizes.txt")]
    assert "images/dog/dog9.jpg,24,18" in sizes
    assert sorted(p.name for p in dst.parent.iterdir()) == ["animals"]  # no temporary folder left

    # the output is a clean dataset
    checked = check_dataset(dst, dst / "metadata", workers=1)
    assert checked.problems == () and checked.total_images == 12


def test_splits_are_stratified_and_deterministic_for_a_seed(tmp_path):
    src = fake_voc(tmp_path / "src")

    def assignment(seed: int, name: str) -> dict[str, list[str]]:
        out = tmp_path / name
        convert_voc(src, out, seed=seed)
        return {s: read(out / "metadata" / s / "image_ids.txt") for s in ("train", "val", "test")}

    first, again, other = assignment(0, "a"), assignment(0, "b"), assignment(1, "c")
    assert first == again
    assert first != other
    for split in (first, other):
        for name, count in {"train": 4, "val": 1, "test": 1}.items():
            assert sum(i.startswith("images/cat/") for i in split[name]) == count
            assert sum(i.startswith("images/dog/") for i in split[name]) == count
    labels = read(tmp_path / "a" / "metadata" / "train" / "class_labels.txt")
    assert all(line.endswith(",0") == line.startswith("images/cat/") for line in labels)


def test_given_classes_fix_the_labels_and_leave_out_the_others(tmp_path):
    src = fake_voc(tmp_path / "src")
    report = convert_voc(src, tmp_path / "a", classes=["dog", "cat", "bird"])
    assert report.classes == ("dog", "cat", "bird") and report.converted == 12
    assert read(tmp_path / "a" / "classes.txt") == ["dog", "cat", "bird"]
    assert all(line.endswith(",1") == line.startswith("images/cat/")
               for line in read(tmp_path / "a" / "metadata" / "train" / "class_labels.txt"))
    only_cats = convert_voc(src, tmp_path / "b", classes=["cat"])
    assert only_cats.counts["train"] == {"cat": 4} and only_cats.converted == 6
    assert "dogs/JPEGImages/dog1.jpg: class 'dog' is not among the classes given" in map(str, only_cats.skipped)
    with pytest.raises(ValueError, match="classes: .* is not allowed; distinct names usable as folder names"):
        convert_voc(src, tmp_path / "c", classes=["cat", "cat"])


def test_split_counts():
    assert split_counts(10, (0.7, 0.1, 0.2)) == [7, 1, 2]
    assert split_counts(3, (0.7, 0.1, 0.2)) == [1, 1, 1]  # one each from 3 images on
    assert split_counts(4, (0.9, 0.1, 0.0)) == [3, 1, 0]  # ... only for the splits that have a share
    assert split_counts(2, (0.7, 0.1, 0.2)) == [1, 0, 1]
    assert split_counts(7, (1.0, 0.0, 0.0)) == [7, 0, 0]
    assert split_counts(100, (0.71, 0.09, 0.2)) == [71, 9, 20]


@pytest.mark.parametrize("splits", [(0.5, 0.5), (0.8, 0.3, -0.1), (0.7, 0.1, 0.1), ("a", 0, 1), 0.5])
def test_bad_splits_are_refused_naming_the_option(splits):
    with pytest.raises(ValueError, match=r"^--splits: .* is not allowed; allowed: 3 non-negative fractions"):
        validate_splits(splits)


def test_a_second_conversion_is_refused_and_dst_stays_as_it_was(tmp_path):
    src, dst = fake_voc(tmp_path / "src"), tmp_path / "dst"
    convert_voc(src, dst)
    before = tree(dst)
    with pytest.raises(FileExistsError, match="exists and is not an empty folder; .* nothing you made is lost"):
        convert_voc(src, dst, seed=5)
    assert tree(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_voc(src, empty).converted == 12  # an empty folder is fine


def test_a_crash_leaves_no_half_written_dst(tmp_path, monkeypatch):
    src, dst = fake_voc(tmp_path / "src"), tmp_path / "dst"
    calls = []

    def failing_copy(a, b):
        calls.append(a)
        if len(calls) == 3:
            raise OSError("disk full")
        return Path(b).write_bytes(Path(a).read_bytes())

    monkeypatch.setattr(voc.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        convert_voc(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_convert_voc_prints_the_report(tmp_path):
    src, dst = fake_voc(tmp_path / "src"), tmp_path / "dst"
    run = [sys.executable, "-m", "trainers.datasets", "convert-voc", str(src), str(dst), "--splits", "0.5,0.25,0.25",
           "--seed", "3"]
    result = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (f"converted 12 images of 2 classes from {src} into {dst} "
                                             "(splits 0.5,0.25,0.25, seed 3)")
    assert "  cat-images/stray.jpg: no XML annotation names this image" in result.stdout.splitlines()
    again = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1
    assert "exists and is not an empty folder" in again.stderr


@pytest.mark.skipif(not VOC_ANIMALS.is_dir(), reason=f"{VOC_ANIMALS} (real photographs) is not here")
def test_real_voc_animals_converts_all_but_the_truncated_jpeg(tmp_path):
    dst = tmp_path / "voc-animals"
    report = convert_voc(VOC_ANIMALS, dst)

    # 364 photographs: one truncated JPEG; every kangaroo XML's <path> names a file elsewhere
    assert [n.source for n in report.skipped] == ["kangaroo-images/00090.jpg"]
    assert report.skipped[0].reason.startswith("cannot decode the image (image file is truncated")
    assert report.fixed == ()
    assert report.counts == {"train": {"kangaroo": 114, "raccoon": 140}, "val": {"kangaroo": 16, "raccoon": 20},
                             "test": {"kangaroo": 33, "raccoon": 40}}
    assert read(dst / "classes.txt") == ["kangaroo", "raccoon"]
    checked = check_dataset(dst, dst / "metadata", workers=2)
    assert checked.problems == () and checked.total_images == 363
    # several boxes per image are kept (raccoon-1 has one, some kangaroos up to 8)
    assert max(len(r.boxes) for s in ("train", "val", "test") for r in checked.records(s)) == 8
    # copied, not re-encoded (3 raccoons are greyscale JPEGs: they stay so)
    for record in checked.records("test"):
        copied = dst / record.image_id
        assert copied.read_bytes() == (VOC_ANIMALS / f"{copied.parent.name}-images" / copied.name).read_bytes()
