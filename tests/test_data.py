import gzip
import struct

import pytest
import torch

from ddp_train.config import FitConfig
from ddp_train.data import (EvalChunkSampler, ResumableDistributedSampler, TensorData, build_data,
                            train_loader)
from ddp_train.errors import UsageError
from ddp_train.models import build_model


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n, batch", [(101, 16), (7, 3), (1, 4), (64, 8)])
def test_eval_sampler_covers_each_index_once(world, n, batch):
    seen = [i for rank in range(world) for chunk in EvalChunkSampler(n, batch, rank, world) for i in chunk]
    assert sorted(seen) == list(range(n))


def test_eval_chunks_do_not_depend_on_world_size():
    one = list(EvalChunkSampler(50, 8, 0, 1))
    three = {c: chunk for r in range(3) for c, chunk in
             zip(EvalChunkSampler(50, 8, r, 3).chunk_ids(), EvalChunkSampler(50, 8, r, 3))}
    assert [three[c] for c in sorted(three)] == one


def test_resumable_sampler_skips_indices_not_data():
    ds = TensorData(torch.arange(40.0), torch.arange(40))
    s = ResumableDistributedSampler(ds, num_replicas=2, rank=1, seed=3)
    s.set_epoch(5)
    full = list(s)
    s.set_epoch(5, start=6)
    assert list(s) == full[6:] and len(s) == len(full) - 6


def test_batched_loader_matches_per_sample_order():
    ds = TensorData(torch.arange(30.0).view(30, 1), torch.arange(30))
    cfg = FitConfig(batch_size=4, seed=1)
    loader = train_loader(ds, cfg, rank=0, world_size=2, cuda=False)
    loader.sampler.sampler.set_epoch(2)
    ref = ResumableDistributedSampler(ds, num_replicas=2, rank=0, seed=1)
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


def test_imagefolder_from_generated_pngs(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(folder / f"{i}.png")
    b = build_data(FitConfig(data="imagefolder", data_dir=str(tmp_path)))
    assert (len(b.train), b.num_outputs, b.input_shape) == (6, 2, (3, 10, 12))


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
    with pytest.raises(UsageError, match="has no function 'nope'"):
        build_data(FitConfig(data="tests.fixtures.userdefs:nope"))
    with pytest.raises(UsageError, match="cannot import"):
        build_data(FitConfig(data="no_such_pkg.mod:fn"))
    with pytest.raises(UsageError, match="must return a torch.nn.Module"):
        build_model("tests.fixtures.userdefs:not_a_module", (5,), 2)
