"""Stage-two training as DistributedDataParallel processes (real torch.distributed, gloo on the CPU)."""

import numpy as np
import pytest
import torch
from semisam_o1.stage_two import training
from semisam_o1.stage_two.ddp import _reopen, _shareable, train_processes
from semisam_o1.stage_two.training import train_network
from semisam_o1.stage_two.params import TrainParams

#: Tiny and fast; 3 cases per epoch with batch 4 makes every batch 3 rows: shards of 2 and 1 rows.
PARAMS = TrainParams(patch=(16, 16, 16), iterations=4, batch_size=4, channels=(4, 8), seed=3)


@pytest.fixture()
def cases(tmp_path):
    """3 random (24, 24, 24) volumes in [0, 1] with 3-class labels; the first image memory-mapped from disk."""
    rng = np.random.default_rng(1)
    images = [rng.random((24, 24, 24), dtype=np.float32) for _ in range(3)]
    labels = [(x > 0.6).astype(np.uint8) + (x > 0.85).astype(np.uint8) for x in images]
    np.save(tmp_path / "image0.npy", images[0])
    images[0] = np.load(tmp_path / "image0.npy", mmap_mode="r")
    return images, labels


def test_two_processes_train_what_one_does(cases, monkeypatch):
    """From the same starting weights (``init``, as stage two's ``warm_start`` passes the previous round's)."""
    images, labels = cases
    one_losses, two_losses, replicas = [], [], []
    torch.manual_seed(5)
    init = training.build_network(3, PARAMS).state_dict()  # not the network the seed 3 of PARAMS builds
    one = train_network(images, labels, 3, TrainParams(**{**PARAMS.__dict__, "processes": 1}),
                        lambda i, loss: one_losses.append((i, loss)), init=init)

    def spy(*args, **kwargs):  # the real function; keeps what it returns
        replicas.extend(real(*args, **kwargs))
        return replicas

    real = training.train_network_replicas
    monkeypatch.setattr(training, "train_network_replicas", spy)
    two = train_network(images, labels, 3, TrainParams(**{**PARAMS.__dict__, "processes": 2}),
                        lambda i, loss: two_losses.append((i, loss)), init=init)

    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in one.modules())  # no batch statistics
    assert len(replicas) == 2
    assert all(torch.equal(replicas[0][k], replicas[1][k]) for k in replicas[0])
    assert not two.training and all(p.device.type == "cpu" for p in two.parameters())
    assert all(torch.equal(v, replicas[0][k]) for k, v in two.state_dict().items())
    # progress: every step, the whole batch's loss (dropout masks included) as one process computes it
    assert [i for i, _ in two_losses] == [i for i, _ in one_losses] == [1, 2, 3, 4]
    np.testing.assert_allclose([x for _, x in two_losses], [x for _, x in one_losses], rtol=1e-4, atol=1e-5)
    # weights: the same up to rounding, except conv biases right before instance norm (their gradient is 0 up to
    # rounding, which Adam scales to steps of the learning rate); they do not change the output
    a, b = one.state_dict(), two.state_dict()
    for k in a:
        if k.endswith("weight"):
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    x = torch.as_tensor(np.asarray(images[1])[None, None, :16, :16, :16])
    with torch.no_grad():
        torch.testing.assert_close(two(x), one(x), rtol=1e-4, atol=1e-4)


def test_batch_size_must_be_a_multiple_of_the_processes(cases):
    images, labels = cases
    with pytest.raises(ValueError, match="train_processes"):
        train_network(images, labels, 3, TrainParams(**{**PARAMS.__dict__, "batch_size": 3, "processes": 2}))
    assert train_processes(TrainParams(processes=None), "cpu") == 1
    assert train_processes(TrainParams(batch_size=4, processes=4), "cpu") == 4


def test_a_failed_process_raises_its_error(cases):
    images, labels = cases
    labels = [label * 3 for label in labels]  # classes up to 6 for a 3-class network: one-hot fails in every rank
    with pytest.raises(RuntimeError, match="DDP training process .* failed(.|\n)*index"):
        train_network(images, labels, 3, TrainParams(**{**PARAMS.__dict__, "processes": 2}))


def test_memory_mapped_arrays_reach_the_processes_by_file(tmp_path):
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    for view in (mapped, mapped[2:], mapped[1:3].T):  # contiguous views: reopened from the file at their offset
        shared = _shareable(view)
        assert isinstance(shared, tuple) and shared[1] == str(tmp_path / "a.npy")
        reopened = _reopen(shared)
        assert isinstance(reopened, np.memmap) and reopened.shape == view.shape
        np.testing.assert_array_equal(reopened, view)
    strided = _shareable(mapped[:, ::2])  # not contiguous: a copy
    assert not isinstance(strided, (tuple, np.memmap))
    np.testing.assert_array_equal(strided, mapped[:, ::2])
    assert _shareable(array) is array
