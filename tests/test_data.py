import gzip
import struct

import pytest
import torch

from torch.utils.data import DistributedSampler

from ddp_train.config import FitConfig
from ddp_train.data import TensorData, build_data, train_loader
from ddp_train.errors import UsageError
from ddp_train.models import build_model
from ddp_train.sampling import EvalChunks, TrainSampler


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n, batch", [(101, 16), (7, 3), (1, 4), (64, 8)])
def test_eval_chunks_cover_each_index_once(world, n, batch):
    seen = [i for rank in range(world) for chunk in EvalChunks(n, batch, rank, world, as_lists=True) for i in chunk]
    assert sorted(seen) == list(range(n))


def test_eval_chunks_do_not_depend_on_world_size():
    one = list(EvalChunks(50, 8, 0, 1))
    three = {c: chunk for r in range(3) for c, chunk in
             zip(EvalChunks(50, 8, r, 3).chunk_ids(), EvalChunks(50, 8, r, 3))}
    assert [three[c] for c in sorted(three)] == one


@pytest.mark.parametrize("n, world, batch", [(40, 2, 4), (31, 3, 5), (5, 4, 2), (30, 1, 7), (3, 2, 8)])
def test_train_sampler_is_distributed_samplers_order(n, world, batch):
    """Index tensors, but exactly DistributedSampler's shuffle and padding, rank by rank."""
    for rank in range(world):
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3)
        ref.set_epoch(5)
        ours = TrainSampler(n, batch, rank, world, seed=3)
        ours.set_epoch(5)
        got = [i for epoch, idx in ours for i in (range(n)[idx] if isinstance(idx, slice) else idx.tolist())]
        if world == 1 and batch >= n:
            assert sorted(got) == sorted(ref)  # one full batch: the data set in stored order
        else:
            assert got == list(ref)
        assert all(epoch == 5 for epoch, _ in ours)


def test_train_sampler_starts_mid_epoch_by_skipping_indices():
    s = TrainSampler(40, 4, rank=1, world_size=2, seed=3)
    s.set_epoch(5)
    full = [idx for _, idx in s]
    s.set_epoch(5, start_batch=2)
    rest = [idx for _, idx in s]
    assert len(rest) == len(s) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:]))


def test_one_full_batch_is_a_view_not_a_gather():
    ds = TensorData(torch.arange(30.0).view(30, 1), torch.arange(30))
    loader, _ = train_loader(ds, 64, rank=0, world_size=1, seed=0, workers=0, cuda=False)
    [(x, y)] = list(loader)
    assert x.data_ptr() == ds.x.data_ptr() and torch.equal(y, ds.y)


def test_batched_loader_matches_per_sample_order():
    ds = TensorData(torch.arange(30.0).view(30, 1), torch.arange(30))
    loader, sampler = train_loader(ds, 4, rank=0, world_size=2, seed=1, workers=0, cuda=False)
    sampler.set_epoch(2)
    ref = DistributedSampler(ds, num_replicas=2, rank=0, seed=1)
    ref.set_epoch(2)
    got = torch.cat([y for _, y in loader]).tolist()
    assert got == list(ref)


def test_digits_ships_with_a_dependency():
    b = build_data(FitConfig())
    assert (len(b.train), len(b.val), b.num_outputs, b.input_shape) == (1438, 359, 10, (64,))
    assert float(b.train.x.max()) <= 1.0


def test_linreg_is_the_classic_problem():
    b = build_data(FitConfig(data="linreg", samples=20000))
    x, y = b.train.x, b.train.y
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution.flatten()
    assert torch.allclose(sol, torch.tensor([2.0, -3.0, 10.0]), atol=0.1)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UsageError, match="choose one of digits, synthetic"):
        build_data(FitConfig(data="imagenet"))
    with pytest.raises(UsageError, match="choose mlp, cnn, linear"):
        build_model("resnet9000", (3, 32, 32), 10)


def test_cnn_is_the_classic_one():
    assert sum(p.numel() for p in build_model("cnn", (1, 28, 28), 10).parameters()) == 320 + 51264 + 2080 + 330  # 53,994


def _write_idx(path, array, magic):
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.numpy().tobytes())


def test_mnist_from_generated_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", torch.randint(0, 255, (n, 28, 28), dtype=torch.uint8), 2051)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", torch.randint(0, 10, (n,), dtype=torch.uint8), 2049)
    b = build_data(FitConfig(data="mnist", data_dir=str(tmp_path)))
    assert (len(b.train), len(b.val), b.input_shape, b.default_model) == (12, 5, (1, 28, 28), "cnn")


def test_missing_mnist_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="pass --download"):
        build_data(FitConfig(data="mnist", data_dir=str(tmp_path)))
    with pytest.raises(UsageError, match="does not exist"):
        build_data(FitConfig(data="mnist", data_dir=str(tmp_path / "nope")))
    with pytest.raises(UsageError, match="pass --data-dir"):
        build_data(FitConfig(data="cifar10"))


@pytest.mark.slow
def test_download_without_a_network_is_one_clear_line(tmp_path, capfd):
    with pytest.raises(UsageError) as exc:
        build_data(FitConfig(data="mnist", data_dir=str(tmp_path), download=True))
    message = str(exc.value)
    assert "\n" not in message and "could not be downloaded" in message and "drop --download" in message
    assert capfd.readouterr().out == ""


def test_imagefolder_from_generated_pngs(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(folder / f"{i}.png")
    b = build_data(FitConfig(data="imagefolder", data_dir=str(tmp_path), image_size=16))
    assert (len(b.train), b.num_outputs, b.input_shape, b.classes) == (6, 2, (3, 16, 16), ["cat", "dog"])
    x, y = b.val[4]  # resized and centre-cropped to 16x16, normalised
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert b.train.transform is not b.val.transform


def test_imagefolder_is_streamed_not_loaded(tmp_path):
    """Image folders stay on disk (read per sample by the loader), unlike the in-memory sets."""
    from PIL import Image
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "a" / "0.png")
    b = build_data(FitConfig(data="imagefolder", data_dir=str(tmp_path), image_size=8))
    assert not isinstance(b.train, TensorData)
    black = b.train[0][0]
    Image.new("RGB", (8, 8), "white").save(tmp_path / "train" / "a" / "0.png")
    assert not torch.equal(b.train[0][0], black)  # the file as it is now: read when the sample is asked for


def test_image_size_only_for_image_folders():
    with pytest.raises(UsageError, match="--image-size applies to --data imagefolder"):
        build_data(FitConfig(data="digits", image_size=32))


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(UsageError, match="no usable images"):
        build_data(FitConfig(data="imagefolder", data_dir=str(tmp_path)))


def test_user_functions():
    b = build_data(FitConfig(data="tests.fixtures.userdefs:blobs"))
    assert (b.num_outputs, b.input_shape, b.default_model) == (2, (5,), "mlp")
    assert isinstance(build_model("tests.fixtures.userdefs:tiny_net", (5,), 2), torch.nn.Module)
    with pytest.raises(UsageError, match="must return a dict"):
        build_data(FitConfig(data="tests.fixtures.userdefs:not_a_dict"))
    with pytest.raises(UsageError, match="has no 'nope'"):
        build_data(FitConfig(data="tests.fixtures.userdefs:nope"))
    with pytest.raises(UsageError, match="cannot import"):
        build_data(FitConfig(data="no_such_pkg.mod:fn"))
    with pytest.raises(UsageError, match="must return a torch.nn.Module"):
        build_model("tests.fixtures.userdefs:not_a_module", (5,), 2)
