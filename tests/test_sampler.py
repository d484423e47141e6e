"""PK sampler: P×K structure, camera preference, determinism and fast-forward (PPLR ``pplr/utils/data/sampler.py``
``RandomMultipleGallerySampler``)."""

import numpy as np
import pytest

from partreid.common.errors import InputError
from partreid.pplr_finetune.sampler import PKSampler, pk_pass


def _toy(num_ids=40, per_id=6, num_cams=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_ids), per_id)
    cams = rng.integers(0, num_cams, labels.size)
    perm = rng.permutation(labels.size)  # ids interleaved in the dataset order
    return labels[perm], cams[perm]


def test_pk_structure_16x4_and_each_id_once_per_pass():
    labels, cams = _toy()
    labels = np.concatenate([labels, [-1, -1, -1]])  # outliers are never drawn
    cams = np.concatenate([cams, [0, 1, 2]])
    s = PKSampler(labels, cams, num_instances=4, batch_size=64, num_iters=None, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == (40 * 4) // 64  # 160 indices per pass -> 2 full batches, tail dropped
    for b in batches:
        assert len(b) == 64
        blocks = labels[b].reshape(16, 4)
        assert (blocks == blocks[:, :1]).all()  # 16 ids x 4 instances, contiguous
        assert len(set(blocks[:, 0])) == 16
        assert (labels[b] >= 0).all()
    one_pass = s.pass_indices(0, 0)
    assert len(one_pass) == 160
    ids = labels[one_pass][::4]
    assert sorted(ids.tolist()) == list(range(40))  # every pseudo-id exactly once, random order
    assert ids.tolist() != sorted(ids.tolist())


def test_camera_preference_without_replacement_when_enough():
    # id 0: anchor camera determines the pool; 5 images in cam 0 and 5 in cam 1 -> other-cam pool of 5 >= K
    labels = np.zeros(10, dtype=int)
    cams = np.array([0] * 5 + [1] * 5)
    groups = [(np.arange(10), cams)]
    for p in range(30):
        idx = pk_pass(groups, 4, np.random.default_rng(p))
        anchor, rest = idx[0], idx[1:]
        assert len(idx) == 4
        assert all(cams[r] != cams[anchor] for r in rest)  # only other cameras
        assert len(set(rest.tolist())) == 3  # without replacement


def test_camera_preference_with_replacement_quirk_and_fallbacks():
    # 1 image in cam 0 + 3 in cam 1: from the cam-0 anchor the other-cam pool has 3 = K-1 < K images,
    # so the reference draws WITH replacement (threshold >= K)
    cams = np.array([0, 1, 1, 1])
    groups = [(np.arange(4), cams)]
    saw_duplicate = False
    for p in range(60):
        idx = pk_pass(groups, 4, np.random.default_rng(p))
        if idx[0] == 0:
            assert all(cams[r] == 1 for r in idx[1:])
            saw_duplicate |= len(set(idx[1:].tolist())) < 3
        else:  # cam-1 anchor: the only other-camera image is index 0, drawn 3 times
            assert idx[1:].tolist() == [0, 0, 0]
    assert saw_duplicate
    # all images in one camera: falls back to the id's other images (not the anchor), without replacement
    same = [(np.array([10, 11, 12, 13, 14]), np.zeros(5, dtype=int))]
    for p in range(20):
        idx = pk_pass(same, 4, np.random.default_rng(p))
        assert len(set(idx.tolist())) == 4
    # a single-image id contributes only itself
    assert pk_pass([(np.array([7]), np.array([2]))], 4, np.random.default_rng(0)).tolist() == [7]


def test_singletons_shift_the_stream_like_the_reference():
    labels = np.array([0, 0, 0, 0, 1, 2, 2, 2, 2])
    cams = np.array([0, 1, 0, 1, 0, 0, 1, 1, 0])
    s = PKSampler(labels, cams, num_instances=4, batch_size=3, num_iters=None, seed=0)
    one = s.pass_indices(0, 0)
    assert len(one) == 9 and (labels[one] == 1).sum() == 1
    assert list(s) == [one[i:i + 3].tolist() for i in (0, 3, 6)]


def test_deterministic_epochs_fast_forward_and_ddp_slices():
    labels, cams = _toy(num_ids=20, per_id=5)
    s = PKSampler(labels, cams, batch_size=64, num_iters=7, seed=3)  # 80 per pass -> 1 batch per pass
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 7
    assert full[1] == s.pass_indices(2, 1)[:64].tolist()  # the pass tail is dropped, next pass starts
    again = PKSampler(labels, cams, batch_size=64, num_iters=7, seed=3)
    again.set_epoch(2)
    assert list(again) == full
    again.set_epoch(3)
    assert list(again) != full
    s.set_epoch(2, start_iter=4)
    assert len(s) == 3 and list(s) == full[4:]
    ranks = [PKSampler(labels, cams, batch_size=64, num_iters=7, seed=3, rank=r, world_size=4) for r in range(4)]
    for r in ranks:
        r.set_epoch(2)
    per_rank = [list(r) for r in ranks]
    for i in range(7):
        assert sum((pr[i] for pr in per_rank), []) == full[i]
        assert all(len(pr[i]) == 16 for pr in per_rank)


def test_sampler_input_errors():
    with pytest.raises(InputError):
        PKSampler([-1, -1], [0, 0])
    with pytest.raises(InputError):
        PKSampler([0, 0, 1], [0, 0])
    with pytest.raises(InputError):  # one pass only (num_iters=None): 2 ids x 4 = 8 images < one batch of 64
        PKSampler([0, 0, 1, 1], [0, 1, 0, 1], num_iters=None)


def test_passes_shorter_than_a_batch_are_concatenated():
    """3 pseudo-ids × 4 images = 12 images per pass < a batch of 32: passes are chained to fill batches."""
    from partreid.pplr_finetune.sampler import PKSampler

    labels = np.repeat(np.arange(3), 4)
    camids = np.tile([0, 1], 6)
    sampler = PKSampler(labels, camids, num_instances=4, batch_size=32, num_iters=5, seed=0)
    batches = list(sampler)
    assert len(batches) == 5 and all(len(b) == 32 for b in batches)
    for b in batches:
        assert set(labels[b]) == {0, 1, 2}
        # each K-run of 4 consecutive indices is one id (P×K structure kept)
        runs = np.asarray(b).reshape(-1, 4)
        assert all(len(set(labels[r])) == 1 for r in runs)
