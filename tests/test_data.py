import shutil

import cv2
import numpy as np
import pytest

from mnet.data import Dataset, check_dataset
from mnet.errors import DataError
from mnet.preprocess import Preprocess

from conftest import write_colour_dataset

PRE = Preprocess((24, 32))


@pytest.fixture
def aicup(tmp_path):
    return write_colour_dataset(tmp_path / "d", {"train": 12, "dev": 6})


def test_aicup_layout_loads_and_caches_uint8(aicup):
    ds = Dataset(aicup)
    assert ds.layout == "aicup" and ds.classes == ("A", "B", "C") and ds.splits() == ["train", "dev"]
    s = ds.load("train", PRE)
    assert s.images.shape == (12, 24, 32, 3) and s.images.dtype == np.uint8
    assert s.class_counts() == {"A": 4, "B": 4, "C": 4}
    # identical to running the shared preprocessing on the decoded file
    np.testing.assert_array_equal(s.images[0], PRE.resize(cv2.imread(s.paths[0])))


def test_aicup2020_release_layout(tmp_path, aicup):
    root = tmp_path / "rel"
    root.mkdir()
    shutil.copytree(aicup / "train", root / "C1-P1_Train")
    shutil.copytree(aicup / "dev", root / "C1-P1_Dev")
    shutil.copy(aicup / "train.csv", root / "train.csv")
    shutil.copy(aicup / "dev.csv", root / "dev.csv")
    (root / "C1-P1_Test").mkdir()
    shutil.copy(aicup / "dev" / "00000.jpg", root / "C1-P1_Test" / "99999.jpg")
    ds = Dataset(root)
    assert ds.layout == "aicup2020" and ds.splits() == ["train", "dev", "test"]
    assert len(ds.load("dev", PRE)) == 6
    test = ds.load("test", PRE)
    assert not test.labelled and test.labels.tolist() == [-1]


def test_imagefolder_layout(tmp_path):
    root = tmp_path / "if"
    for split, n in (("train", 3), ("dev", 1)):
        for c in ("bad", "good"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(root / split / c / f"{i}.png"), np.full((20, 30, 3), 200 if c == "good" else 20, np.uint8))
    ds = Dataset(root)
    assert ds.layout == "imagefolder" and ds.classes == ("bad", "good")
    s = ds.load("train", PRE)
    assert s.class_counts() == {"bad": 3, "good": 3}


def test_corrupt_image_skipped_counted_or_strict(aicup):
    (aicup / "train" / "00001.jpg").write_bytes(b"not a jpeg")
    (aicup / "train" / "00002.jpg").unlink()
    s = Dataset(aicup).load("train", PRE)
    assert len(s) == 10 and len(s.skipped) == 2
    assert any("train.csv:3" in w for w, _ in s.skipped)
    with pytest.raises(DataError, match="2 bad image"):
        Dataset(aicup).load("train", PRE, strict=True)
    report = check_dataset(aicup)
    assert not report.ok and sum("unreadable" in p or "missing" in p for p in report.problems) == 2


def test_unknown_label_names_file_and_line(aicup):
    csv = aicup / "dev.csv"
    lines = csv.read_text().splitlines()
    lines[3] = "00002.jpg,D"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"dev\.csv:4: unknown label 'D'"):
        Dataset(aicup).load("dev", PRE)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../train/00000.jpg", "a/../../x.jpg"])
def test_path_escaping_root_is_refused(aicup, bad):
    csv = aicup / "dev.csv"
    csv.write_text(f"image_id,label\n{bad},A\n")
    with pytest.raises(DataError, match="leaves the dataset root"):
        Dataset(aicup).index("dev")


def test_empty_split_and_missing_class(aicup):
    (aicup / "dev.csv").write_text("image_id,label\n")
    with pytest.raises(DataError, match="empty"):
        Dataset(aicup).load("dev", PRE)
    rows = [r for r in (aicup / "train.csv").read_text().splitlines() if not r.endswith(",C")]
    (aicup / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="class.*C.*no images"):
        Dataset(aicup).load("train", PRE)


def test_bad_header_and_not_a_dataset(tmp_path, aicup):
    (aicup / "dev.csv").write_text("file,grade\nx.jpg,A\n")
    with pytest.raises(DataError, match=r"dev\.csv:1: expected header"):
        Dataset(aicup).index("dev")
    with pytest.raises(DataError, match="not a dataset"):
        Dataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        Dataset(tmp_path / "nope")


def test_check_report_counts(aicup):
    r = check_dataset(aicup)
    assert r.ok, r.problems
    assert r.splits["train"]["counts"] == {"A": 4, "B": 4, "C": 4}
    assert r.splits["train"]["sizes"]["readable"] == 12
