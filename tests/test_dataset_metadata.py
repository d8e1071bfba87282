"""Specification of the metadata reader and the dataset check: exact problems, counts, strictness, CLI."""
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from trainers.datasets.check import DatasetError, check_dataset, require_clean
from trainers.datasets.metadata import ImageRecord, Problem, first_lines, read_split

REPO = Path(__file__).resolve().parents[1]


def image(path: Path, size=(8, 6), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = random.Random(0).randbytes(64 * 48 * 3)  # noise: half the file is scan data, not header
    Image.frombytes("RGB", (64, 48), noise).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header survives, the scan data is cut
    return path


def write(path: Path, *lines: str, ending: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + ending for line in lines).encode("utf-8"))


def split_files(meta: Path, split: str, rows, sizes=True, boxes=True) -> None:
    """rows: (image_id, label, (w, h), [boxes]); the four files of one clean split."""
    write(meta / split / "image_ids.txt", *[r[0] for r in rows])
    write(meta / split / "class_labels.txt", *[f"{r[0]},{r[1]}" for r in rows])
    if sizes:
        write(meta / split / "image_sizes.txt", *[f"{r[0]},{r[2][0]},{r[2][1]}" for r in rows])
    if boxes:
        write(meta / split / "localization.txt", *[f"{r[0]},{','.join(map(str, b))}" for r in rows for b in r[3]])


def clean_dataset(root: Path) -> Path:
    """3 splits of 2 images each, 2 classes; returns the metadata root."""
    meta = root / "metadata"
    for split in ("train", "val", "test"):
        rows = [(f"{split}/cat 1.jpg", 0, (8, 6), [(1, 1, 4, 4)]),
                (f"{split}/dog.png", 1, (10, 7), [(0, 0, 10, 7), (2, 3, 5, 6)])]
        for image_id, _, size, _ in rows:
            image(root / image_id, size)
        split_files(meta, split, rows)
    return meta


def problem_lines(meta) -> list[str]:
    return [str(p) for p in meta.problems]


# ---------------------------------------------------------------- reading


def test_clean_dataset_reads_every_record_and_has_no_problem(tmp_path):
    meta = clean_dataset(tmp_path)
    split = read_split(meta, "val", tmp_path)
    assert split.problems == () and split.bad_ids == frozenset()
    assert split.records == (
        ImageRecord("val/cat 1.jpg", 0, (8, 6), ((1, 1, 4, 4),), (), None),
        ImageRecord("val/dog.png", 1, (10, 7), ((0, 0, 10, 7), (2, 3, 5, 6)), (), None),
    )
    report = check_dataset(tmp_path, meta, workers=1)
    assert report.problems == () and report.decoded == 6
    assert report.format() == "0 problems in 0 images of 6 (train 0, val 0, test 0)"
    assert require_clean(report) == (report, "6 images, no problems")


def test_every_problem_kind_is_found_with_its_file_and_line(tmp_path):
    for name in "abcdefghijklm":
        image(tmp_path / ("c d.jpg" if name == "c" else f"{name}.jpg"))
    m = tmp_path / "metadata" / "val"
    write(m / "image_ids.txt", "a.jpg", "b.jpg", "c d.jpg", "a.jpg", "missing.jpg", "e.jpg", "f.jpg", "g.jpg",
          "x,y.jpg", "h.jpg", "i.jpg", "j.jpg", "k.jpg", "l.jpg", "m.jpg")
    write(m / "class_labels.txt", "a.jpg,0", "b.jpg,one", "c d.jpg,1", "missing.jpg,0", "f.jpg,0", "g.jpg,1",
          "h.jpg,-1", "i.jpg,0", "j.jpg,0", "k.jpg,1", "l.jpg,0", "m.jpg,0", "zzz.jpg,0", "i.jpg,0")
    write(m / "image_sizes.txt", *[f"{n}.jpg,8,6" for n in "abeghijkm"], "c d.jpg,8,6", "missing.jpg,8,6",
          "l.jpg,8,six")
    write(m / "localization.txt", "a.jpg,1,1,4,4", "b.jpg,1,1,4,4", "c d.jpg,1,1,4,4", "c d.jpg,2,2,8,6",
          "e.jpg,0,0,1,1", "f.jpg,0,0,1,1", "h.jpg,0,0,1,1", "i.jpg,5,1,3,4", "j.jpg,0,0,9,6", "k.jpg,0,0,8,6",
          "l.jpg,0,0,1,1", "m.jpg,0,0,1", "missing.jpg,0,0,1,1")

    split = read_split(tmp_path / "metadata", "val", tmp_path)

    assert problem_lines(split) == [
        f"{m}/class_labels.txt:2: label 'one' is not an integer",
        f"{m}/class_labels.txt:7: label -1 is negative; labels are integers from 0",
        f"{m}/class_labels.txt:13: image 'zzz.jpg' is not in image_ids.txt",
        f"{m}/class_labels.txt:14: duplicate label for 'i.jpg' (first on line 8)",
        f"{m}/image_ids.txt:4: duplicate image 'a.jpg' (first on line 1)",
        f"{m}/image_ids.txt:5: image file not found: {tmp_path}/missing.jpg",
        f"{m}/image_ids.txt:6: image 'e.jpg' has no line in class_labels.txt",
        f"{m}/image_ids.txt:7: image 'f.jpg' has no line in image_sizes.txt",
        f"{m}/image_ids.txt:8: image 'g.jpg' has no line in localization.txt; val images need boxes or masks",
        f"{m}/image_ids.txt:9: 'x,y.jpg' has a comma; one path per line, paths may contain spaces but not commas",
        f"{m}/image_sizes.txt:12: size '8' x 'six' is not allowed; width and height are integers >= 1",
        f"{m}/localization.txt:8: box (5, 1, 3, 4) has x1 < x0; boxes are x0,y0,x1,y1 with x0 <= x1, y0 <= y1",
        f"{m}/localization.txt:9: box (0, 0, 9, 6) is outside the 8x6 image; allowed 0 <= x <= 8, 0 <= y <= 6",
        f"{m}/localization.txt:12: expected 5 fields <path>,<x0>,<y0>,<x1>,<y1> or 3 fields "
        "<path>,<mask_png>,<ignore_png>, got 4",
    ]
    # boxes touching width/height exactly (VOC style) are fine; paths may hold spaces
    assert split.records == (
        ImageRecord("c d.jpg", 1, (8, 6), ((1, 1, 4, 4), (2, 2, 8, 6))),
        ImageRecord("k.jpg", 1, (8, 6), ((0, 0, 8, 6),)),
    )
    assert split.bad_ids == {"a.jpg", "b.jpg", "e.jpg", "f.jpg", "g.jpg", "h.jpg", "i.jpg", "j.jpg", "l.jpg",
                             "m.jpg", "missing.jpg"}
    assert split.image_count == 13
    # without file checks the missing image is only a metadata question, and fine
    assert "missing.jpg" not in read_split(tmp_path / "metadata", "val", tmp_path, check_files=False).bad_ids


def test_field_counts_absolute_paths_negative_boxes_and_bad_numbers(tmp_path):
    m = tmp_path / "metadata" / "train"
    image(tmp_path / "a.jpg")
    image(tmp_path / "b.jpg")
    write(m / "image_ids.txt", "a.jpg", "b.jpg", "/data/c.jpg")
    write(m / "class_labels.txt", "a.jpg,0,extra", "b.jpg,1", "/data/c.jpg,0")
    write(m / "image_sizes.txt", "a.jpg,8", "b.jpg,8,0", "/data/c.jpg,8,6")
    write(m / "localization.txt", "b.jpg,-1,0,2,2", "b.jpg,0,0,2.5,2")

    split = read_split(tmp_path / "metadata", "train", tmp_path)

    assert problem_lines(split) == [
        f"{m}/class_labels.txt:1: expected 2 fields <path>,<label>, got 3",
        f"{m}/image_ids.txt:3: image path '/data/c.jpg' is absolute; paths are relative to the images root",
        f"{m}/image_sizes.txt:1: expected 3 fields <path>,<width>,<height>, got 2",
        f"{m}/image_sizes.txt:2: size '8' x '0' is not allowed; width and height are integers >= 1",
        f"{m}/localization.txt:1: box (-1, 0, 2, 2) is outside the image; allowed coordinates >= 0",
        f"{m}/localization.txt:2: box x1 '2.5' is not an integer",
    ]
    assert split.records == () and split.bad_ids == {"a.jpg", "b.jpg", "/data/c.jpg"}


def test_train_may_lack_boxes_and_sizes_val_and_test_may_not(tmp_path):
    meta = tmp_path / "metadata"
    image(tmp_path / "a.jpg")
    for split in ("train", "val"):
        split_files(meta, split, [("a.jpg", 3, (8, 6), [])], sizes=False, boxes=False)

    train = read_split(meta, "train", tmp_path)
    assert train.problems == () and train.records == (ImageRecord("a.jpg", 3, None),)
    val = read_split(meta, "val", tmp_path)
    assert problem_lines(val) == [
        f"{meta}/val/image_sizes.txt:0: missing; val needs image_sizes.txt, lines <path>,<width>,<height>",
        f"{meta}/val/localization.txt:0: missing; val needs boxes <path>,<x0>,<y0>,<x1>,<y1> "
        "or masks <path>,<mask_png>,<ignore_png> to be evaluated",
    ]
    assert val.records == () and val.bad_ids == {"a.jpg"}


def test_missing_image_ids_or_labels_is_one_problem_on_line_zero(tmp_path):
    meta = tmp_path / "metadata"
    write(meta / "train" / "image_ids.txt", "a.jpg", "b.jpg")
    (meta / "test").mkdir()

    train = read_split(meta, "train")
    assert problem_lines(train) == [
        f"{meta}/train/class_labels.txt:0: missing; every split needs class_labels.txt, lines <path>,<label>"]
    assert train.bad_ids == {"a.jpg", "b.jpg"} and train.records == ()
    assert problem_lines(read_split(meta, "test")) == [
        f"{meta}/test/image_ids.txt:0: missing; every split needs image_ids.txt, one image path per line"]
    assert problem_lines(read_split(meta, "val")) == [
        f"{meta}/val/image_ids.txt:0: missing (no folder {meta}/val); every split needs image_ids.txt, "
        "one image path per line"]


def test_windows_endings_bom_blank_lines_and_undecodable_lines(tmp_path):
    m = tmp_path / "metadata" / "train"
    image(tmp_path / "my cat.jpg")
    image(tmp_path / "dog.jpg")
    image(tmp_path / "été.jpg")
    write(m / "image_ids.txt", "\ufeffmy cat.jpg", "", "dog.jpg", "été.jpg", "  ", ending="\r\n")
    (m / "class_labels.txt").write_bytes(b"my cat.jpg,0\r\ndog.jpg,1\r\n\xff\xfe.jpg,1\r\n\xc3\xa9t\xc3\xa9.jpg,1")
    write(m / "image_sizes.txt", "my cat.jpg,8,6", "dog.jpg,8,6", "été.jpg,8,6", "", "")

    split = read_split(tmp_path / "metadata", "train", tmp_path)

    assert problem_lines(split) == [
        f"{m}/class_labels.txt:3: not UTF-8 text (invalid start byte at byte 0); save the file as UTF-8"]
    assert [r.image_id for r in split.records] == ["my cat.jpg", "dog.jpg", "été.jpg"]
    assert first_lines(m / "image_ids.txt") == {"my cat.jpg": 1, "dog.jpg": 3, "été.jpg": 4}


def test_openimages_mask_lines(tmp_path):
    m = tmp_path / "metadata" / "test"
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        image(tmp_path / name)
    for name in ("a_0.png", "a_1.png", "a_ignore.png", "b_0.png", "b_1.png", "b_ignore.png", "d_0.png"):
        Image.new("L", (8, 6)).save(tmp_path / name)
    rows = [("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 1), ("d.jpg", 0)]
    split_files(tmp_path / "metadata", "test", [(i, label, (8, 6), []) for i, label in rows], boxes=False)
    write(m / "localization.txt",
          "a.jpg,a_0.png,a_ignore.png", "a.jpg,a_1.png,",
          "b.jpg,b_0.png,", "b.jpg,b_1.png,b_ignore.png",
          "c.jpg,c_0.png,",
          "d.jpg,d_0.png,", "d.jpg,1,1,4,4")

    split = read_split(tmp_path / "metadata", "test", tmp_path)

    assert problem_lines(split) == [
        f"{m}/localization.txt:4: ignore mask 'b_ignore.png' on a later line of 'b.jpg'; "
        "only an image's first line may name one",
        f"{m}/localization.txt:5: mask file not found: {tmp_path}/c_0.png",
        f"{m}/localization.txt:7: a box line in a file of masks (line 1); one kind per file",
    ]
    assert split.records == (ImageRecord("a.jpg", 0, (8, 6), (), ("a_0.png", "a_1.png"), "a_ignore.png"),)


# ---------------------------------------------------------------- the check


def messy_dataset(root: Path) -> Path:
    """The clean dataset with a truncated train JPEG, a wrong val size and a bad test box."""
    meta = clean_dataset(root)
    truncated_jpeg(root / "train" / "cat 1.jpg")
    write(meta / "val" / "image_sizes.txt", "val/cat 1.jpg,8,6", "val/dog.png,12,9")  # the file is 10x7
    write(meta / "test" / "localization.txt", "test/cat 1.jpg,1,1,4,4", "test/dog.png,0,0,11,7",
          "test/dog.png,5,3,2,6")
    return meta


def test_check_decodes_in_a_pool_and_finds_truncation_and_size_mismatch(tmp_path):
    meta = messy_dataset(tmp_path)
    report = check_dataset(tmp_path, meta, workers=2)

    decode_line, *others = [str(p) for p in report.problems]
    # PIL's own words follow (the byte count is its business)
    assert decode_line.startswith(f"{meta}/train/image_ids.txt:1: cannot decode image {tmp_path}/train/cat 1.jpg: ")
    assert "truncated" in decode_line.split(": ", 2)[2]
    assert others == [
        f"{meta}/val/image_sizes.txt:2: size 12x9 of 'val/dog.png' differs from the decoded image, 10x7",
        f"{meta}/test/localization.txt:2: box (0, 0, 11, 7) is outside the 10x7 image; allowed 0 <= x <= 10, "
        "0 <= y <= 7",
        f"{meta}/test/localization.txt:3: box (5, 3, 2, 6) has x1 < x0; boxes are x0,y0,x1,y1 with x0 <= x1, "
        "y0 <= y1",
    ]
    assert report.format().splitlines()[-1] == "4 problems in 3 images of 6 (train 1, val 1, test 1)"
    assert [r.image_id for r in report.records("train")] == ["train/dog.png"]
    assert report.decoded == 5  # the bad test image was never decoded
    # the same findings without the pool
    assert check_dataset(tmp_path, meta, workers=1).problems == report.problems
    # and none of the decoding ones without decoding
    assert len(check_dataset(tmp_path, meta, decode=False).problems) == 2


def test_truncation_is_caught_even_where_pil_was_told_to_load_truncated_images(tmp_path, monkeypatch):
    from PIL import ImageFile

    from trainers.datasets.check import decode_image_size

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some training code sets it
    with pytest.raises(OSError, match="runcated"):
        decode_image_size(truncated_jpeg(tmp_path / "cut.jpg"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # left as it was found


def test_summary_counts_problems_and_images_per_split(tmp_path):
    meta = clean_dataset(tmp_path)
    truncated_jpeg(tmp_path / "train" / "dog.png")  # a JPEG named .png: PIL goes by content
    write(meta / "test" / "localization.txt", "test/cat 1.jpg,1,1,4,40", "test/cat 1.jpg,-1,1,4,4",
          "test/dog.png,0,0,10,7")
    report = check_dataset(tmp_path, meta, workers=1)
    assert report.format().splitlines()[-1] == "3 problems in 2 images of 6 (train 1, val 0, test 1)"


def test_strict_raises_with_every_line_lenient_skips_the_bad_images(tmp_path):
    meta = messy_dataset(tmp_path)
    report = check_dataset(tmp_path, meta, workers=1)

    with pytest.raises(DatasetError) as caught:
        require_clean(report)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    for problem in report.problems:
        assert str(problem) in message
    assert message.splitlines()[-2:] == [
        "4 problems in 3 images of 6 (train 1, val 1, test 1)",
        "to proceed: fix the lines above, or run lenient (--lenient, strict=False) to skip the 3 images with problems",
    ]

    again = pickle.loads(pickle.dumps(caught.value))  # errors cross process boundaries
    assert str(again) == message and again.report.problems == report.problems

    same, line = require_clean(report, strict=False)
    assert same is report
    assert line == (f"skipping 3 images with problems (4 problems; see `python -m trainers.datasets check "
                    f"{tmp_path} --metadata {meta}`)")
    assert {s: [r.image_id for r in report.records(s)] for s in ("train", "val", "test")} == {
        "train": ["train/dog.png"], "val": ["val/cat 1.jpg"], "test": ["test/cat 1.jpg"]}


def test_check_of_a_folder_without_splits_is_a_problem(tmp_path):
    (tmp_path / "metadata").mkdir()
    report = check_dataset(tmp_path, tmp_path / "metadata")
    assert report.problems == (Problem(str(tmp_path / "metadata"), 0, "no split folder (train, val, test) here; "
                                       "expected <metadata>/<split>/image_ids.txt and friends"),)
    assert report.summary() == "1 problem in 0 images of 0"
    clean_dataset(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "metadata" / "val")
    report = check_dataset(tmp_path, tmp_path / "metadata", workers=1)
    assert report.format().splitlines() == [
        f"not checked (no folder under {tmp_path / 'metadata'}): val",
        "0 problems in 0 images of 4 (train 0, test 0)",
    ]


# ---------------------------------------------------------------- command line


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainers.datasets", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_check_exit_codes(tmp_path):
    clean = tmp_path / "clean"
    clean_dataset(clean)
    messy = tmp_path / "messy"
    meta = messy_dataset(messy)

    ok = cli("check", str(clean))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "0 problems in 0 images of 6 (train 0, val 0, test 0)\n"
    assert "decoding 6/6" in ok.stderr

    strict = cli("check", str(messy), "--workers", "1")
    assert strict.returncode == 1
    lines = strict.stdout.splitlines()
    assert len(lines) == 5 and lines[1] == (f"{meta}/val/image_sizes.txt:2: size 12x9 of 'val/dog.png' differs "
                                            "from the decoded image, 10x7")
    assert lines[-1] == "4 problems in 3 images of 6 (train 1, val 1, test 1)"
    assert strict.stderr.splitlines()[-1].startswith("to proceed: fix the lines above")

    lenient = cli("check", str(messy), "--metadata", str(meta), "--lenient", "--no-decode", "--splits", "val,test")
    assert lenient.returncode == 0
    assert lenient.stdout.splitlines()[-1] == "2 problems in 1 image of 4 (val 0, test 1)"
    assert lenient.stderr.startswith("skipping 1 image with problems (2 problems; see")


@pytest.mark.parametrize("args, says", [
    (["check", "/nonexistent/root"], "ROOT: /nonexistent/root is not a folder"),
    (["check", "{root}", "--splits", "train,dev"], "--splits: 'train,dev' is not allowed"),
    (["check", "{root}", "--workers", "0"], "--workers: 0 is not allowed"),
    (["check", "{root}", "--metadata", "/nonexistent/meta"], "--metadata: /nonexistent/meta is not a folder"),
    (["check", "{root}", "--bogus"], "unrecognized arguments: --bogus"),
    (["convert-voc", "{root}", "{root}/out", "--splits", "0.5,0.5"], "--splits: 0.5,0.5 is not allowed"),
])
def test_cli_bad_arguments_exit_2_with_one_line(tmp_path, args, says):
    clean_dataset(tmp_path)
    result = cli(*[a.format(root=tmp_path) for a in args])
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and says in result.stderr


def test_cli_help_is_instant_and_imports_no_tool():
    code = ("import sys, runpy\nsys.argv = ['x', '--help']\n"
            "try:\n    runpy.run_module('trainers.datasets', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('PIL', 'torch', 'trainers.datasets.check', 'trainers.datasets.voc') "
            "if m in sys.modules]\nprint('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "convert-voc" in result.stdout and "HEAVY []" in result.stdout
