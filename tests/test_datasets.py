"""Dataset readers (common/data/) and image loading (common/data/images.py).

Real data: ../shared/data beside the repository (skipped when absent). Everything else runs on small file
trees generated in tmp_path: empty files where the reader only looks at names, tiny real images where
pixels are read.
"""

import hashlib
import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from partreid.common.data import compute_fingerprint, load_dataset, load_file_index
from partreid.common.errors import InputError
from partreid.common.data.images import ImageDataset, collate_skip_none, missing_rows

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder: index caches never land in ~/.cache or in a dataset folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def need_shared():
    if not (SHARED / "cuhk01").is_dir():
        pytest.skip(f"real test images not found at {SHARED} (../shared/data beside the repository)")


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def image_bytes(seed: int, fmt: str = "JPEG", size=(8, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def rows(ds, split=None):
    f = ds.frame if split is None else ds.split(split)
    return [(r.path, r.pid, r.camid, r.split) for r in f.itertuples()]


def sha_lines(paths):
    return f"{len(paths)}:" + hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- real data

def test_shared_cuhk01_counts():
    need_shared()
    ds = load_dataset(f"market1501:{SHARED / 'cuhk01'}", verbose=False)
    f = ds.frame
    assert ds.kind == "market1501" and ds.root == SHARED / "cuhk01"
    assert (f.split == "train").sum() == 1940
    assert (f.split == "query").sum() == 972
    assert (f.split == "gallery").sum() == 972
    assert f.pid.nunique() == 971
    assert sorted(f.camid.unique()) == [0, 1]
    assert set(ds.split("train").pid) == set(range(1, 486))  # raw pids, not relabelled
    assert set(ds.split("query").pid) == set(range(486, 972))
    assert ds.fingerprint == sha_lines(f.path.tolist())
    img = ds.open_image(f.path[0])
    assert img.mode == "RGB" and img.size == (60, 160)


def test_shared_cuhk03_duke_market_counts():
    need_shared()
    c3 = load_dataset(str(SHARED / "cuhk03-labeled-val"), verbose=False)  # a path: layout detected
    assert (c3.frame.split == "query").sum() == 200 and (c3.frame.split == "gallery").sum() == 738
    assert c3.frame.pid.nunique() == 100 and c3.splits == ["query", "gallery"]
    duke = load_dataset(f"dukemtmc:{SHARED / 'dukemtmc-mini'}", verbose=False)
    assert (duke.frame.split == "query").sum() == 3 and (duke.frame.split == "gallery").sum() == 21
    assert duke.frame.pid.nunique() == 15 and duke.frame.camid.nunique() == 7
    assert duke.frame.camid.max() <= 7
    mk = load_dataset(f"market1501:{SHARED / 'market1501-mini'}", verbose=False)
    assert rows(mk) == [("query/0001_c1s1_001051_00.jpg", 1, 0, "query"),
                        ("query/0001_c6s1_009601_00.jpg", 1, 5, "query")]
    with pytest.raises(InputError, match="no 'train' split"):
        mk.split("train")


def test_shared_bare_name_and_summary(monkeypatch, capsys):
    need_shared()
    monkeypatch.setenv("REID_DATA", str(SHARED))
    ds = load_dataset("CUHK01")  # folder is 'cuhk01': matched case-insensitively
    assert ds.kind == "market1501" and len(ds.frame) == 3884
    err = capsys.readouterr().err
    lines = [ln.split("|") for ln in err.splitlines() if "|" in ln]
    table = {c[0].strip(): [x.strip() for x in c[1:]] for c in lines}
    assert table["train"] == ["485", "1940", "2"]
    assert table["query"] == ["486", "972", "2"]
    assert table["total"] == ["971", "3884", "2"]


# ------------------------------------------------------------------------------------------- Market / Duke

def make_market(root: Path):
    names = {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s3_077419_03.jpg",
                               "-1_c1s1_000001_00.jpg", "Thumbs.db", ".hidden.jpg"],
        "query": ["0007_c6s1_000151_00.jpg"],
        "bounding_box_test": ["0000_c1s1_000151_01.jpg", "0000_c4s1_000001_02.JPG", "-1_c2s1_000000_00.jpg",
                              "-1_c5s1_000001_00.jpg", "0007_c1s1_000000_01.png"],
    }
    for folder, files in names.items():
        for n in files:
            touch(root / folder / n)


def test_market_junk_dropped_distractors_kept(tmp_path, capsys):
    make_market(tmp_path / "mk")
    ds = load_dataset(f"market1501:{tmp_path / 'mk'}")
    assert rows(ds) == [
        ("bounding_box_train/0002_c1s1_000451_03.jpg", 2, 0, "train"),
        ("bounding_box_train/0002_c2s1_000301_01.jpg", 2, 1, "train"),
        ("bounding_box_train/0007_c3s3_077419_03.jpg", 7, 2, "train"),
        ("query/0007_c6s1_000151_00.jpg", 7, 5, "query"),
        ("bounding_box_test/0000_c1s1_000151_01.jpg", 0, 0, "gallery"),
        ("bounding_box_test/0000_c4s1_000001_02.JPG", 0, 3, "gallery"),
        ("bounding_box_test/0007_c1s1_000000_01.png", 7, 0, "gallery"),
    ]
    assert ds.frame.pid.dtype == np.int64 and ds.frame.camid.dtype == np.int64
    assert "dropped 3 junk images" in capsys.readouterr().err
    # gallery: 2 ids (distractor pid 0 counts as one, as in the peers' logs)
    gallery_line = [ln for ln in ds.summary().splitlines() if ln.strip().startswith("gallery")][0]
    assert [x.strip() for x in gallery_line.split("|")[1:]] == ["2", "3", "2"]


def test_market_parent_folder_and_errors(tmp_path):
    make_market(tmp_path / "data" / "Market-1501-v15.09.15")
    ds = load_dataset(f"market1501:{tmp_path / 'data'}", verbose=False)
    assert ds.root == tmp_path / "data" / "Market-1501-v15.09.15" and len(ds.frame) == 7
    with pytest.raises(InputError, match="not found"):
        load_dataset(f"market1501:{tmp_path / 'nope'}", verbose=False)
    touch(tmp_path / "bad" / "query" / "img_0001.jpg")
    with pytest.raises(InputError, match=r"img_0001\.jpg: file name does not match"):
        load_dataset(f"market1501:{tmp_path / 'bad'}", verbose=False)
    (tmp_path / "empty" / "query").mkdir(parents=True)
    with pytest.raises(InputError, match="no images found"):
        load_dataset(f"market1501:{tmp_path / 'empty'}", verbose=False)
    (tmp_path / "nosplits" / "x").mkdir(parents=True)
    with pytest.raises(InputError, match="no Market-style split folders"):
        load_dataset(f"market1501:{tmp_path / 'nosplits'}", verbose=False)


def test_dukemtmc_gallery_alias_partial_splits(tmp_path):
    for n in ["0005_c2_f0046985.jpg", "0005_c8_f0046999.jpg"]:
        touch(tmp_path / "gallery" / n)
    touch(tmp_path / "query" / "0005_c7_f0100000.jpg")
    ds = load_dataset(f"dukemtmc:{tmp_path}", verbose=False)
    assert ds.kind == "dukemtmc" and ds.splits == ["query", "gallery"]
    assert rows(ds, "gallery") == [("gallery/0005_c2_f0046985.jpg", 5, 1, "gallery"),
                                   ("gallery/0005_c8_f0046999.jpg", 5, 7, "gallery")]


# ------------------------------------------------------------------------------------------- MSMT17

def make_msmt(root: Path, train_dir="train", test_dir="test"):
    lists = {
        "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0001/0001_004_15_0303noon_0100_1.jpg 1"],
        "list_val.txt": ["0000/0000_045_12_0303morning_0006_2.jpg 0"],
        "list_query.txt": ["0000/0000_000_03_0303afternoon_0001_0.jpg 0"],
        "list_gallery.txt": ["0000/0000_001_05_0304morning_0002_0.jpg 0",
                             "0002/0002_003_10_0304noon_0003_1.jpg 2", ""],
    }
    for name, lines in lists.items():
        touch(root / name, ("\n".join(lines) + "\n").encode())
        folder = train_dir if name in ("list_train.txt", "list_val.txt") else test_dir
        for ln in lines:
            if ln:
                touch(root / folder / ln.split()[0])


def test_msmt17_v1(tmp_path, capsys):
    make_msmt(tmp_path / "MSMT17_V1")
    ds = load_dataset(f"msmt17:{tmp_path}", verbose=False)  # parent folder: MSMT17_V1 found inside
    assert ds.version == "MSMT17_V1" and ds.root == tmp_path / "MSMT17_V1"
    assert rows(ds) == [
        ("train/0000/0000_000_01_0303morning_0015_0.jpg", 0, 0, "train"),
        ("train/0000/0000_045_12_0303morning_0006_2.jpg", 0, 11, "train"),  # from list_val
        ("train/0001/0001_004_15_0303noon_0100_1.jpg", 1, 14, "train"),
        ("test/0000/0000_000_03_0303afternoon_0001_0.jpg", 0, 2, "query"),
        ("test/0000/0000_001_05_0304morning_0002_0.jpg", 0, 4, "gallery"),
        ("test/0002/0002_003_10_0304noon_0003_1.jpg", 2, 9, "gallery"),
    ]
    assert "V2" not in capsys.readouterr().err and ds.warnings == []


def test_msmt17_v2_detected_and_warned(tmp_path, capsys):
    make_msmt(tmp_path / "MSMT17_V2", "mask_train_v2", "mask_test_v2")
    ds = load_dataset(f"msmt17:{tmp_path / 'MSMT17_V2'}", verbose=False)
    assert ds.version == "MSMT17_V2"
    assert ds.split("train").path.tolist()[0] == "mask_train_v2/0000/0000_000_01_0303morning_0015_0.jpg"
    assert len(ds.split("gallery")) == 2
    assert "MSMT17_V2" in capsys.readouterr().err and any("V1" in w for w in ds.warnings)
    # V2 image folders under a neutral name: still V2 (image folders decide)
    make_msmt(tmp_path / "msmt", "mask_train_v2", "mask_test_v2")
    assert load_dataset(f"msmt17:{tmp_path / 'msmt'}", verbose=False).version == "MSMT17_V2"
    # A V2 release whose image folders were renamed train/ test/: the folder name still says V2
    make_msmt(tmp_path / "MSMT17_V2_renamed", "train", "test")
    ds = load_dataset(f"msmt17:{tmp_path / 'MSMT17_V2_renamed'}", verbose=False)
    assert ds.version == "MSMT17_V2" and any("folder name says" in w for w in ds.warnings)
    # neutral name + train/ test/ folders: V1
    make_msmt(tmp_path / "MSMT17", "train", "test")
    assert load_dataset(f"msmt17:{tmp_path / 'MSMT17'}", verbose=False).version == "MSMT17_V1"


def test_msmt17_missing_files_and_bad_lines(tmp_path):
    make_msmt(tmp_path / "MSMT17_V1")
    os.remove(tmp_path / "MSMT17_V1" / "test" / "0002" / "0002_003_10_0304noon_0003_1.jpg")
    ds = load_dataset(f"msmt17:{tmp_path / 'MSMT17_V1'}", verbose=False)
    assert len(ds.split("gallery")) == 1 and any("1 list entries have no image" in w for w in ds.warnings)
    with pytest.raises(InputError, match="0002_003_10_0304noon_0003_1.jpg"):
        load_dataset(f"msmt17:{tmp_path / 'MSMT17_V1'}", verbose=False, strict=True)
    with open(tmp_path / "MSMT17_V1" / "list_query.txt", "a") as f:
        f.write("0003/badname.jpg 3\n")
    with pytest.raises(InputError, match=r"list_query\.txt:2: file name '0003/badname"):
        load_dataset(f"msmt17:{tmp_path / 'MSMT17_V1'}", verbose=False)


# ------------------------------------------------------------------------------------------- CUHK03-NP

def test_cuhk03np_labeled_detected(tmp_path):
    base = tmp_path / "cuhk03-np"
    for variant, n in (("labeled", 1), ("detected", 2)):
        for i in range(n):
            touch(base / variant / "bounding_box_train" / f"0001_c1_{i}.png")
        touch(base / variant / "query" / "0700_c2_1.png")
        touch(base / variant / "bounding_box_test" / "0700_c1_3.png")
    lab = load_dataset(f"cuhk03np:{tmp_path}", verbose=False)
    assert lab.version == "labeled" and lab.root == base / "labeled" and len(lab.split("train")) == 1
    assert rows(lab, "query") == [("query/0700_c2_1.png", 700, 1, "query")]
    det = load_dataset(f"cuhk03np-detected:{base}", verbose=False)
    assert det.version == "detected" and len(det.split("train")) == 2
    det2 = load_dataset(f"cuhk03np:{base / 'detected'}", verbose=False)
    assert det2.version == "detected" and det2.fingerprint == det.fingerprint
    assert det.fingerprint != lab.fingerprint
    with pytest.raises(InputError, match="asked for CUHK03-NP labeled"):
        load_dataset(f"cuhk03np-labeled:{base / 'detected'}", verbose=False)


# ------------------------------------------------------------------------------------------- folder

def test_folder_flat_names_with_and_without_camera(tmp_path):
    for n in ["0003_c2_a.jpg", "0003_c4s2_0001.bmp", "0010.jpeg", "0010_0002.jpg", "-1_c1_x.jpg"]:
        touch(tmp_path / "flat" / n)
    ds = load_dataset(f"folder:{tmp_path / 'flat'}", verbose=False)
    assert rows(ds) == [("0003_c2_a.jpg", 3, 1, "all"), ("0003_c4s2_0001.bmp", 3, 3, "all"),
                        ("0010.jpeg", 10, -1, "all"), ("0010_0002.jpg", 10, -1, "all")]
    touch(tmp_path / "flat" / "person.jpg")
    with pytest.raises(InputError, match="person.jpg"):
        load_dataset(f"folder:{tmp_path / 'flat'}", verbose=False)


def test_folder_subfolder_per_pid_and_splits(tmp_path):
    root = tmp_path / "ids"
    touch(root / "train" / "bob" / "x_c2_1.jpg")
    touch(root / "train" / "alice" / "deep" / "1.png")
    touch(root / "query" / "carol" / "c_c1.jpg")
    touch(root / "gallery" / "alice" / "2.jpg")
    touch(root / "gallery" / "carol" / "3.jpg")
    ds = load_dataset(f"folder:{root}", verbose=False)
    assert ds.pid_names == ["alice", "bob", "carol"]  # one numbering across all splits
    assert rows(ds) == [("train/alice/deep/1.png", 0, -1, "train"), ("train/bob/x_c2_1.jpg", 1, 1, "train"),
                        ("query/carol/c_c1.jpg", 2, 0, "query"),
                        ("gallery/alice/2.jpg", 0, -1, "gallery"), ("gallery/carol/3.jpg", 2, -1, "gallery")]
    touch(tmp_path / "num" / "0042" / "a.jpg")
    touch(tmp_path / "num" / "7" / "b_c3.jpg")
    ds = load_dataset(f"folder:{tmp_path / 'num'}", verbose=False)
    assert ds.pid_names is None
    assert rows(ds) == [("0042/a.jpg", 42, -1, "all"), ("7/b_c3.jpg", 7, 2, "all")]


# ------------------------------------------------------------------------------------------- csv

def test_csv_with_camid_and_split(tmp_path):
    touch(tmp_path / "imgs" / "a.jpg")
    touch(tmp_path / "imgs" / "b.png")
    touch(tmp_path / "other" / "c.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,pid,camid,split\n"
                   f"imgs/b.png,4,1,gallery\n"
                   f"imgs/a.jpg,3,0,query\n"
                   f"{tmp_path / 'imgs' / 'a.jpg'},3,,gallery\n")
    ds = load_dataset(f"csv:{csv}", verbose=False)
    assert ds.kind == "csv" and ds.root == tmp_path
    assert rows(ds) == [("imgs/a.jpg", 3, 0, "query"), ("imgs/a.jpg", 3, -1, "gallery"),
                        ("imgs/b.png", 4, 1, "gallery")]


def test_csv_without_camid_and_errors(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    (tmp_path / "m.csv").write_text("path,pid\nb.jpg,2\na.jpg,\n")
    ds = load_dataset(f"csv:{tmp_path / 'm.csv'}", verbose=False)
    assert rows(ds) == [("a.jpg", -1, -1, "all"), ("b.jpg", 2, -1, "all")]
    assert load_dataset(str(tmp_path / "m.csv"), verbose=False).fingerprint == ds.fingerprint  # bare .csv path
    (tmp_path / "bad.csv").write_text("path,pid\na.jpg,x1\n")
    with pytest.raises(InputError, match=r"row 2: pid 'x1' is not an integer"):
        load_dataset(f"csv:{tmp_path / 'bad.csv'}", verbose=False)
    (tmp_path / "nocol.csv").write_text("file,pid\na.jpg,1\n")
    with pytest.raises(InputError, match="lacks column"):
        load_dataset(f"csv:{tmp_path / 'nocol.csv'}", verbose=False)
    (tmp_path / "gone.csv").write_text("path,pid\nsub/zz.jpg,1\n")
    with pytest.raises(InputError, match="relative to the CSV's folder"):
        load_dataset(f"csv:{tmp_path / 'gone.csv'}", verbose=False)
    (tmp_path / "split.csv").write_text("path,pid,split\na.jpg,1,val\n")
    with pytest.raises(InputError, match="unknown split"):
        load_dataset(f"csv:{tmp_path / 'split.csv'}", verbose=False)


# ------------------------------------------------------------------------------------------- LUPerson tree

def test_luperson_tree_index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "LUPerson"
    for p in ["00_cn/01_bj/v1/00000000.jpg", "00_cn/01_bj/v1/00000001.JPEG", "01_us/v9/a.png",
              "top.jpg", "00_cn/notes.txt", "01_us/.x.jpg"]:
        touch(root / p)
    expected = ["00_cn/01_bj/v1/00000000.jpg", "00_cn/01_bj/v1/00000001.JPEG", "01_us/v9/a.png", "top.jpg"]
    ds = load_dataset(f"luperson:{root}", verbose=False)
    assert ds.kind == "luperson" and len(ds) == 4 and ds.splits == ["train"]
    assert [ds.path_at(i) for i in range(4)] == expected
    assert ds.frame.path.tolist() == expected
    assert set(ds.frame.pid) == {-1} and set(ds.frame.camid) == {-1} and set(ds.frame.split) == {"train"}
    assert ds.fingerprint == sha_lines(expected)
    cached = list((tmp_path / "xdg" / "partreid").glob("file-index-LUPerson-*.bin"))
    assert len(cached) == 1 and not (root / ".partreid").exists()
    cache = cached[0]
    # reused: a file added three levels down does not change ROOT's or its children's mtimes
    touch(root / "00_cn" / "01_bj" / "v1" / "00000002.jpg")
    paths, fp, source = load_file_index(root)
    assert source == f"cache:{cache}" and paths.tolist() == expected and fp == ds.fingerprint
    # a cached table pickles as a re-opened memory map, equal to the original
    again = pickle.loads(pickle.dumps(paths))
    assert again == paths and again.tolist() == expected and len(pickle.dumps(paths)) < 400
    # refresh forces a new listing
    paths, _, source = load_file_index(root, refresh=True)
    assert source == "scan" and len(paths) == 5
    # invalidated when ROOT's mtime changes
    touch(root / "00_cn" / "01_bj" / "v1" / "00000003.jpg")
    st = root.stat()
    os.utime(root, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    ds2 = load_dataset(f"luperson:{root}", verbose=False)
    assert len(ds2.frame) == 6 and ds2.fingerprint != ds.fingerprint
    assert load_file_index(root)[2] == f"cache:{cache}"
    # a truncated cache file is ignored and rewritten
    cache.write_bytes(cache.read_bytes()[:-3])
    assert load_file_index(root)[2] == "scan" and load_file_index(root)[2] == f"cache:{cache}"


def test_luperson_tree_read_only_and_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ro = tmp_path / "ro"
    touch(ro / "b" / "2.jpg", image_bytes(2))
    touch(ro / "a" / "1.jpg", image_bytes(1))
    for d in (ro / "a", ro / "b", ro):
        d.chmod(0o555)
    try:
        ds = load_dataset(f"luperson:{ro}", verbose=False)
        assert ds.paths.tolist() == ["a/1.jpg", "b/2.jpg"] and sorted(os.listdir(ro)) == ["a", "b"]
        assert len(list((tmp_path / "xdg" / "partreid").glob("file-index-ro-*.bin"))) == 1
        # the dataset's own memory-mapped table is served, no copy; workers decode the same pixels
        images = ImageDataset(load_dataset(f"luperson:{ro}", verbose=False), transform=None)
        assert images._paths._file is not None
        loader = torch.utils.data.DataLoader(images, batch_size=1, num_workers=2,
                                             collate_fn=lambda b: (np.asarray(b[0][0]), b[0][1]))
        got = {i: arr for arr, i in loader}
        want = {i: np.asarray(Image.open(io.BytesIO(image_bytes(i + 1))).convert("RGB")) for i in range(2)}
        assert all(np.array_equal(got[i], want[i]) for i in range(2))
    finally:
        for d in (ro, ro / "a", ro / "b"):
            d.chmod(0o755)


# ------------------------------------------------------------------------------------------- LUPerson LMDB

def build_lmdb(root: Path, items: dict, with_keys=True, subdir="lup_lmdb"):
    lmdb = pytest.importorskip("lmdb")
    db = root / subdir if subdir else root
    db.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k.encode("ascii"), v)
    env.close()
    if with_keys:
        with open(root / "keys.pkl", "wb") as f:
            pickle.dump(list(items), f)


def test_luperson_lmdb_pixels(tmp_path):
    jpg = image_bytes(1)
    png_arr = np.arange(8 * 16 * 3, dtype=np.uint8).reshape(16, 8, 3)
    buf = io.BytesIO()
    Image.fromarray(png_arr).save(buf, format="PNG")
    items = {"01_00_0003_00000001": buf.getvalue(), "00_00_0000_00000000": jpg}
    build_lmdb(tmp_path / "lup", items)
    ds = load_dataset(f"luperson:{tmp_path / 'lup'}", verbose=False)
    assert ds.kind == "lmdb" and ds.lmdb_path == tmp_path / "lup" / "lup_lmdb"
    assert ds.frame.path.tolist() == ["00_00_0000_00000000", "01_00_0003_00000001"]
    assert ds.fingerprint == sha_lines(list(items))
    np.testing.assert_array_equal(np.asarray(ds.open_image("01_00_0003_00000001")), png_arr)
    want = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(ds.open_image("00_00_0000_00000000")), want)
    with pytest.raises(OSError, match="key not in the LMDB"):
        ds.open_image("99_99_9999_99999999")
    # no keys.pkl: keys listed from the LMDB itself; lmdb:ROOT spec
    build_lmdb(tmp_path / "nokeys", items, with_keys=False, subdir=None)
    ds2 = load_dataset(f"lmdb:{tmp_path / 'nokeys'}", verbose=False)
    assert ds2.fingerprint == ds.fingerprint
    # the sorted key list is cached outside the dataset, and reused
    cached = sorted((tmp_path / "xdg-cache" / "partreid").glob("lmdb-keys-*.bin"))
    assert len(cached) == 2
    ds3 = load_dataset(f"luperson:{tmp_path / 'lup'}", verbose=False)
    assert ds3.paths == ds.paths and ds3.paths._file is not None and ds3.fingerprint == ds.fingerprint


def test_lmdb_dataloader_workers_count_skips(tmp_path):
    items = {f"00_00_0000_{i:08d}": image_bytes(i) for i in range(6)}
    items["00_00_0000_00000003"] = b"not a jpeg"
    build_lmdb(tmp_path / "lup", items)
    ds = load_dataset(f"luperson:{tmp_path / 'lup'}", verbose=False)
    ds.open_image(ds.frame.path[0])  # environment opened in the parent before the workers fork

    def to_tensor(img):
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)

    data = ImageDataset(ds, ds.frame, to_tensor)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=collate_skip_none)
    got = {}
    received = []
    for images, idx in loader:
        received.append(idx)
        for im, i in zip(images, idx.tolist()):
            got[i] = im
    assert sorted(got) == [0, 1, 2, 4, 5]
    assert missing_rows(len(data), received) == [3]
    assert data.skipped == 1  # counted in a worker, visible in the main process
    want = np.asarray(Image.open(io.BytesIO(items["00_00_0000_00000005"])).convert("RGB"))
    np.testing.assert_array_equal(got[5].permute(1, 2, 0).numpy(), want)


def test_lmdb_missing_package(tmp_path, monkeypatch):
    build_lmdb(tmp_path / "lup", {"00_00_0000_00000000": image_bytes(0)})
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'partreid\[lmdb\]'"):
        load_dataset(f"luperson:{tmp_path / 'lup'}", verbose=False)


# ------------------------------------------------------------------------------------------- REID_DATA

def test_reid_data_bare_names(tmp_path, monkeypatch):
    monkeypatch.delenv("REID_DATA", raising=False)
    with pytest.raises(InputError, match="REID_DATA"):
        load_dataset("LUPerson", verbose=False)
    touch(tmp_path / "LUPerson" / "x" / "1.jpg")
    build_lmdb(tmp_path / "LUP-lmdb", {"00_00_0000_00000000": image_bytes(0)})
    make_market(tmp_path / "market1501" / "Market-1501-v15.09.15")
    make_msmt(tmp_path / "MSMT17_V1")
    monkeypatch.setenv("REID_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".xdg"))
    ds = load_dataset("luperson", verbose=False)
    assert ds.kind == "luperson" and ds.root == tmp_path / "LUPerson" and len(ds.frame) == 1
    assert load_dataset("lup-LMDB", verbose=False).kind == "lmdb"
    mk = load_dataset("Market1501", verbose=False)
    assert mk.kind == "market1501" and len(mk.frame) == 7
    assert load_dataset("market1501:MARKET1501", verbose=False).fingerprint == mk.fingerprint
    msmt = load_dataset("msmt17_v1", verbose=False)
    assert msmt.kind == "msmt17" and msmt.version == "MSMT17_V1"
    with pytest.raises(InputError, match="no dataset 'duke' in REID_DATA"):
        load_dataset("duke", verbose=False)


def test_spec_errors(tmp_path):
    with pytest.raises(InputError, match="unknown dataset kind 'imagenet'"):
        load_dataset(f"imagenet:{tmp_path}", verbose=False)
    with pytest.raises(InputError, match="no root after"):
        load_dataset("market1501:", verbose=False)
    with pytest.raises(InputError, match="empty dataset spec"):
        load_dataset("  ", verbose=False)
    with pytest.raises(InputError, match="malformed dataset spec"):
        load_dataset("a*b", verbose=False)


# ------------------------------------------------------------------------------------------- fingerprint

def test_fingerprint_hand_computed(tmp_path):
    touch(tmp_path / "b" / "0002_c1_x.jpg")
    touch(tmp_path / "a" / "0001_c1_x.jpg")
    ds = load_dataset(f"folder:{tmp_path}", verbose=False)
    text = b"a/0001_c1_x.jpg\nb/0002_c1_x.jpg"
    assert ds.fingerprint == "2:" + hashlib.sha256(text).hexdigest()
    assert compute_fingerprint(["b/0002_c1_x.jpg", "a/0001_c1_x.jpg"]) == ds.fingerprint
    os.rename(tmp_path / "b" / "0002_c1_x.jpg", tmp_path / "b" / "0002_c1_y.jpg")
    assert load_dataset(f"folder:{tmp_path}", verbose=False).fingerprint != ds.fingerprint


# ------------------------------------------------------------------------------------------- corrupt images

def test_corrupt_image_skip_and_strict(tmp_path, capsys):
    good = image_bytes(7)
    touch(tmp_path / "0001_c1_good.jpg", good)
    touch(tmp_path / "0001_c2_trunc.jpg", good[: len(good) // 2])
    touch(tmp_path / "0002_c1_text.png", b"hello, not an image")
    ds = load_dataset(f"folder:{tmp_path}", verbose=False)
    data = ImageDataset(ds, ds.frame, lambda im: torch.from_numpy(np.asarray(im).copy()))
    items = [data[i] for i in range(len(data))]
    assert [it is None for it in items] == [False, True, True]
    assert data.skipped == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "0001_c2_trunc.jpg") in err and str(tmp_path / "0002_c1_text.png") in err
    want = np.asarray(Image.open(tmp_path / "0001_c1_good.jpg").convert("RGB"))
    np.testing.assert_array_equal(items[0][0].numpy(), want)
    images, idx = collate_skip_none(items)
    assert images.shape == (1, 16, 8, 3) and idx.tolist() == [0]
    images, idx = collate_skip_none([None, None])
    assert images.numel() == 0 and idx.dtype == torch.long and len(idx) == 0
    with pytest.raises(OSError, match="0001_c2_trunc.jpg"):
        ds.open_image("0001_c2_trunc.jpg")
    strict = ImageDataset(ds, ds.frame, None, strict=True)
    with pytest.raises(InputError, match="0002_c1_text.png"):
        strict[2]
    # strict inherited from load_dataset(strict=True)
    ds_strict = load_dataset(f"folder:{tmp_path}", verbose=False, strict=True)
    with pytest.raises(InputError, match="0001_c2_trunc.jpg"):
        ImageDataset(ds_strict)[1]
