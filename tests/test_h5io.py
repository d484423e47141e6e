"""The HDF5 contract: round trips, exact names, validation errors and atomic writes."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from partreid.common.errors import InputError
from partreid.common.h5io import (FeaturesWriter, features_for_labels, read_features, read_labels, write_features,
                         write_labels)
from tests.conftest import script


def test_features_round_trip_exact_names(features_file):
    f = read_features(features_file)
    assert f.global_feats.shape == (12, 8) and f.global_feats.dtype == np.float32
    assert f.parts.shape == (12, 3, 4)
    assert list(f.pid) == [i // 4 for i in range(12)]
    assert list(f.camid) == [i % 2 for i in range(12)]
    assert f.path[5] == "0001_c2_0005.jpg"
    assert f.attrs["format"] == "partreid.features" and f.attrs["format_version"] == 1
    assert f.attrs["normalized"] is True or f.attrs["normalized"] == 1
    assert f.attrs["image_size"] == [256, 128]
    for key in ("dataset", "dataset_root", "dataset_fingerprint", "split", "model_sha256", "command",
                "package_version", "created"):
        assert key in f.attrs
    with h5py.File(features_file) as h:
        assert set(h.keys()) == {"global", "parts", "path", "pid", "camid"}
        assert h["pid"].dtype == np.int64 and h["global"].dtype == np.float32
        assert h5py.check_string_dtype(h["path"].dtype).encoding == "utf-8"


def test_labels_round_trip_and_csv(features_file, tmp_path):
    f = read_features(features_file)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, -1, 2, 2, 2])
    agreement = np.linspace(0, 1, 36, dtype=np.float32).reshape(12, 3)
    knn = np.tile(np.arange(5), (12, 1))
    out = write_labels(tmp_path / "l.h5", labels, features_file=features_file, path=f.path, pid=f.pid,
                       camid=f.camid, attrs={"eps": 0.6, "k1": 30}, agreement=agreement, knn=knn)
    lab = read_labels(out)
    np.testing.assert_array_equal(lab.labels, labels)
    np.testing.assert_array_equal(lab.knn, knn)
    np.testing.assert_allclose(lab.agreement, agreement)
    assert lab.attrs["eps"] == 0.6 and lab.attrs["k1"] == 30 and lab.num_clusters == 3
    assert features_for_labels(lab).global_feats.shape == (12, 8)
    csv = write_labels(tmp_path / "l.csv", labels, features_file=features_file, path=f.path, pid=f.pid,
                       camid=f.camid, attrs={"eps": 0.6}, agreement=agreement)
    back = read_labels(csv)
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_allclose(back.agreement, agreement, atol=1e-6)
    assert back.attrs["features_sha256"] == lab.attrs["features_sha256"] and back.attrs["eps"] == 0.6
    assert list(back.path) == list(f.path)


def test_hash_mismatch_names_both_files(features_file, tmp_path):
    f = read_features(features_file)
    out = write_labels(tmp_path / "l.h5", np.zeros(12, int), features_file=features_file, path=f.path,
                       pid=f.pid, camid=f.camid, attrs={})
    g = f.global_feats.copy()
    g[0, 0] += 1.0
    write_features(features_file, g, f.parts, f.path, f.pid, f.camid, {"normalized": False})
    with pytest.raises(InputError) as err:
        features_for_labels(read_labels(out))
    assert str(out) in str(err.value) and str(features_file) in str(err.value)


def test_writer_resume_and_skipped_rows(tmp_path):
    out = tmp_path / "w.h5"
    attrs = {"normalized": False, "dataset_fingerprint": "4:abc", "split": "all", "model_sha256": "m"}
    g = np.arange(40, dtype=np.float32).reshape(10, 4)
    w = FeaturesWriter(out, [f"{i}.jpg" for i in range(10)], range(10), [0] * 10, 4, None, attrs)
    w.write(0, g[:4])
    w.close()  # killed here
    assert not out.exists()
    w2 = FeaturesWriter(out, [f"{i}.jpg" for i in range(10)], range(10), [0] * 10, 4, None, attrs, resume=True)
    assert w2.rows_done == 4
    skipped = np.zeros(6, bool)
    skipped[1] = True  # row 5 unreadable
    w2.write(4, g[4:], skipped=skipped)
    w2.finish()
    f = read_features(out)
    assert len(f) == 9 and 5 not in f.pid and f.attrs["num_skipped"] == 1
    np.testing.assert_array_equal(f.global_feats, np.delete(g, 5, axis=0))
    # a different model does not resume
    w3 = FeaturesWriter(tmp_path / "x.h5", ["a"], [0], [0], 4, None, dict(attrs, model_sha256="other"),
                        resume=True)
    assert w3.rows_done == 0
    w3.close()


@pytest.mark.parametrize("header", ["empty file", "no attributes", "resume_key without rows_done"])
def test_writer_resume_starts_afresh_from_a_partial_killed_while_its_header_was_written(tmp_path, header):
    """A writer killed between creating its partial file and finishing the header leaves a partial file that
    ``--resume`` cannot continue: it is replaced, not an error."""
    from partreid.common.fileio import new_partial

    out = tmp_path / "w.h5"
    attrs = {"normalized": False, "dataset_fingerprint": "2:abc", "split": "all", "model_sha256": "m"}
    if header == "resume_key without rows_done":  # killed between the two attributes
        killed = FeaturesWriter(out, ["a.jpg", "b.jpg"], [0, 1], [0, 0], 4, None, attrs)
        killed.close()
        stale = killed.partial
        with h5py.File(stale, "r+") as f:
            del f.attrs["rows_done"]
    else:
        stale = new_partial(out, ".h5")
    if header == "no attributes":
        with h5py.File(stale, "w") as f:
            f.create_dataset("global", shape=(2, 4), dtype=np.float32)
    w = FeaturesWriter(out, ["a.jpg", "b.jpg"], [0, 1], [0, 0], 4, None, attrs, resume=True)
    assert w.rows_done == 0 and w.partial != stale and not stale.exists()
    w.write(0, np.eye(2, 4, dtype=np.float32))
    w.finish()
    np.testing.assert_array_equal(read_features(out).global_feats, np.eye(2, 4, dtype=np.float32))


def _inspect(path):
    return subprocess.run([script("inspect-data"), str(path)], capture_output=True, text=True)


def _corrupt_cases(features_file, tmp_path):
    f = read_features(features_file)
    cases = {}
    cases["missing"] = (tmp_path / "nope.h5", "no such")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h:
        h.attrs["format"] = "something.else"
        h["x"] = np.zeros(3)
    cases["other format"] = (other, "not a partreid.features file")
    trunc = tmp_path / "trunc.h5"
    data = features_file.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (trunc, "trunc.h5")
    text = tmp_path / "text.h5"
    text.write_text("hello")
    cases["not hdf5"] = (text, "not an HDF5 file")
    mism = tmp_path / "mism.h5"
    write_features(mism, f.global_feats, f.parts, f.path, f.pid, f.camid, {"normalized": True})
    with h5py.File(mism, "a") as h:
        del h["pid"]
        h["pid"] = np.zeros(5, np.int64)
    cases["mismatched N"] = (mism, "mismatched N")
    nan = tmp_path / "nan.h5"
    write_features(nan, f.global_feats, f.parts, f.path, f.pid, f.camid, {"normalized": True})
    with h5py.File(nan, "a") as h:
        h["global"][3, 2] = np.nan
    cases["NaN"] = (nan, "NaN/Inf")
    inf = tmp_path / "inf.h5"
    write_features(inf, f.global_feats, f.parts, f.path, f.pid, f.camid, {"normalized": True})
    with h5py.File(inf, "a") as h:
        h["parts"][1, 0, 0] = np.inf
    cases["Inf"] = (inf, "NaN/Inf")
    version = tmp_path / "version.h5"
    write_features(version, f.global_feats, f.parts, f.path, f.pid, f.camid, {"normalized": True})
    with h5py.File(version, "a") as h:
        h.attrs["format_version"] = 99
    cases["version"] = (version, "format_version 99 is not supported")
    return cases


def test_corruption_cases_library_and_cli(features_file, tmp_path):
    for name, (path, message) in _corrupt_cases(features_file, tmp_path).items():
        with pytest.raises(InputError) as err:
            read_features(path)
        assert message in str(err.value) and str(path.name) in str(err.value), name
        assert "\n" not in str(err.value), name
        proc = _inspect(path)
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, name
        assert proc.stdout == ""


def test_labels_file_errors(features_file, tmp_path):
    with pytest.raises(InputError, match="not a partreid.labels file"):
        read_labels(features_file)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,pid\na.jpg,1\n")
    with pytest.raises(InputError, match="missing column"):
        read_labels(bad)
    f = read_features(features_file)
    with pytest.raises(InputError, match="mismatched N"):
        write_labels(tmp_path / "l.h5", np.zeros(3, int), features_file=features_file, path=f.path, pid=f.pid,
                     camid=f.camid, attrs={})


def test_never_overwrites_input(features_file):
    f = read_features(features_file)
    with pytest.raises(InputError, match="refusing to overwrite the input"):
        write_labels(features_file, np.zeros(12, int), features_file=features_file, path=f.path, pid=f.pid,
                     camid=f.camid, attrs={})
    assert read_features(features_file).global_feats.shape == (12, 8)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "f.h5"
    with pytest.raises(InputError):
        write_features(out, np.full((2, 3), np.nan, np.float32), None, ["a", "b"], [0, 1], [0, 0],
                       {"normalized": False})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- issue 12 mechanisms
def test_atomic_path_mode_follows_umask_and_cleans_up(tmp_path):
    from partreid.common.fileio import atomic_path

    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a.json") as tmp:
            assert tmp.name.startswith(f".a.json.{os.getpid()}-") and ".partial" in tmp.name
            tmp.write_text("{}")
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "b.json") as tmp:
                tmp.write_text("half")
                raise RuntimeError("writer failed")
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_output_lock_refuses_another_process_and_is_reentrant(tmp_path):
    from partreid.common.errors import OutputBusyError
    from partreid.common.fileio import atomic_path, lock_file_for, output_lock

    dest = tmp_path / "f.h5"
    probe = ("import sys\nfrom partreid.common.fileio import output_lock\n"
             "try:\n    with output_lock(sys.argv[1]):\n        print('got it')\n"
             "except OSError as e:\n    print('busy', e)\n")
    with output_lock(dest):
        with atomic_path(dest) as tmp:  # the same process takes it again
            tmp.write_bytes(b"x")
        assert lock_file_for(dest).exists()
        other = subprocess.run([sys.executable, "-c", probe, str(dest)], capture_output=True, text=True)
        assert other.stdout.startswith("busy") and f"(pid {os.getpid()})" in other.stdout
    assert not lock_file_for(dest).exists()
    other = subprocess.run([sys.executable, "-c", probe, str(dest)], capture_output=True, text=True)
    assert other.stdout.strip() == "got it"
    assert issubclass(OutputBusyError, InputError) and issubclass(OutputBusyError, OSError)


@pytest.mark.parametrize("step", ["_acquire", "new_partial"])
def test_ctrl_c_while_a_lock_or_partial_file_is_created_leaves_nothing(tmp_path, monkeypatch, step):
    """A Ctrl-C that arrives right after the lock file (or the partial file) was created, before it was recorded
    for clean-up, is held to the end of that step and raised where the clean-up runs: nothing is left behind."""
    import signal

    from partreid.common import fileio

    real = getattr(fileio, step)

    def interrupted(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler inside os.kill for a signal to itself
        return made

    monkeypatch.setattr(fileio, step, interrupted)
    # Python's own Ctrl-C handler, also where the suite runs with SIGINT ignored (started in the background by a
    # shell without job control, or under nohup), where Python leaves SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with fileio.atomic_path(tmp_path / "f.h5") as tmp:
                tmp.write_bytes(b"x")
        assert list(tmp_path.iterdir()) == []
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_writer_partial_is_unique_and_locked(tmp_path):
    from partreid.common.errors import OutputBusyError

    out = tmp_path / "w.h5"
    attrs = {"normalized": False, "dataset_fingerprint": "1:a", "split": "all", "model_sha256": "m"}
    w = FeaturesWriter(out, ["a", "b"], [0, 1], [0, 0], 2, None, attrs)
    assert w.partial.name.startswith(f".w.h5.{os.getpid()}-") and w.partial.name.endswith(".partial.h5")
    probe = ("import sys\nfrom partreid.common.h5io import FeaturesWriter\n"
             "try:\n    FeaturesWriter(sys.argv[1], ['a'], [0], [0], 2, None, {'normalized': False})\n"
             "except OSError as e:\n    print('busy')\n")
    other = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True)
    assert other.stdout.strip() == "busy", other.stderr
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".h5"] == [w.partial.name]  # nothing truncated
    w.write(0, np.ones((2, 2), np.float32))
    w.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.h5"]
    assert issubclass(OutputBusyError, OSError)


def test_readers_refuse_empty_and_check_unloaded_parts(features_file, tmp_path):
    empty = write_features(tmp_path / "e.h5", np.zeros((0, 4), np.float32), None, [], [], [], {"normalized": True})
    with pytest.raises(InputError, match=r"N = 0"):
        read_features(empty)
    assert len(read_features(empty, allow_empty=True)) == 0
    bad = tmp_path / "p.h5"
    bad.write_bytes(features_file.read_bytes())
    with h5py.File(bad, "a") as h:
        h["parts"][7, 2, 1] = np.nan
    with pytest.raises(InputError, match=r"'parts' holds NaN/Inf values \(first at row 7\)"):
        read_features(bad, parts=False)  # not loaded, still validated
    with h5py.File(bad, "a") as h:
        del h["parts"]
        h["parts"] = np.zeros((11, 3, 4), np.float32)
    with pytest.raises(InputError, match="'parts' has 11 rows, expected 12"):
        read_features(bad, parts=False)
