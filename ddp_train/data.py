"""Data sets (a registry of builders) and the distributed train/eval loaders."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from .config import FitConfig, parse_shape
from .errors import UsageError
from .metrics import CLASSIFICATION, REGRESSION
from .userfn import load_user_function


class TensorData(Dataset):
    """An in-memory data set. Indexing with a list of indices gathers a whole batch in one op per
    tensor, which the loaders use instead of per-sample __getitem__ + collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, list):
            index = torch.as_tensor(index, device=self.x.device)
        return self.x[index], self.y[index]

    def to(self, device: torch.device) -> "TensorData":
        return TensorData(self.x.to(device), self.y.to(device))


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    task: str
    num_outputs: int
    input_shape: tuple[int, ...]
    default_model: str
    test: Dataset | None = None


DATASETS: dict[str, Callable[[FitConfig], DataBundle]] = {}


def register(name: str):
    def wrap(fn):
        DATASETS[name] = fn
        return fn
    return wrap


def build_data(cfg: FitConfig) -> DataBundle:
    if ":" in cfg.data:
        return _user_data(cfg)
    if cfg.data not in DATASETS:
        raise UsageError(f"unknown data set {cfg.data!r}; choose one of {', '.join(DATASETS)}, "
                         "or package.module:function")
    return DATASETS[cfg.data](cfg)


def build_data_rank0_first(cfg: FitConfig, comm: Any) -> DataBundle:
    """Collective: with --download, rank 0 fetches first while the others wait, then they load."""
    if not (cfg.download and comm.active):
        return build_data(cfg)
    built: list = []
    comm.rank0(lambda: built.append(build_data(cfg)))  # returns None: no data set is broadcast
    return built[0] if built else build_data(cfg.replace(download=False))


def _split(x: torch.Tensor, y: torch.Tensor, val_fraction: float) -> tuple[TensorData, TensorData]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_val = round(len(x) * val_fraction)
    return TensorData(x[perm[n_val:]], y[perm[n_val:]]), TensorData(x[perm[:n_val]], y[perm[:n_val]])


@register("digits")
def digits(cfg: FitConfig) -> DataBundle:
    """The 8x8 handwritten digits (1,797 images) shipped inside scikit-learn: no download."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.exists():
        with gzip.open(path, "rt") as f:
            rows = torch.tensor([[float(v) for v in line.split(",")] for line in f])
        x, y = rows[:, :-1], rows[:, -1].long()
    else:  # layout of the package changed: take the slower public loader
        from sklearn.datasets import load_digits
        x_np, y_np = load_digits(return_X_y=True)
        x, y = torch.tensor(x_np, dtype=torch.float32), torch.tensor(y_np)
    train, val = _split(x / 16.0, y, 0.2)
    return DataBundle(train, val, CLASSIFICATION, 10, (64,), "mlp")


@register("synthetic")
def synthetic(cfg: FitConfig) -> DataBundle:
    """Learnable classification data: a random prototype per class plus noise."""
    shape = parse_shape(cfg.input_shape, "--input-shape")
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(cfg.classes, *shape, generator=g)

    def make(n: int) -> TensorData:
        y = torch.randint(cfg.classes, (n,), generator=g)
        return TensorData(protos[y] + 1.5 * torch.randn(n, *shape, generator=g), y)

    train, val = make(cfg.samples), make(cfg.val_samples)
    return DataBundle(train, val, CLASSIFICATION, cfg.classes, shape, "cnn" if len(shape) == 3 else "mlp")


@register("linreg")
def linreg(cfg: FitConfig) -> DataBundle:
    """y = x . [2, -3] + 10 + N(0, 2^2): the classic two-feature linear regression."""
    g = torch.Generator().manual_seed(1234)

    def make(n: int) -> TensorData:
        x = torch.randn(n, 2, generator=g)
        y = x @ torch.tensor([[2.0], [-3.0]]) + 10.0 + 2.0 * torch.randn(n, 1, generator=g)
        return TensorData(x, y)

    return DataBundle(make(cfg.samples), make(cfg.val_samples), REGRESSION, 1, (2,), "linear")


def _torchvision_set(cls_name: str, mean: Sequence[float], std: Sequence[float]):
    def build(cfg: FitConfig) -> DataBundle:
        import torchvision

        root = _data_dir(cfg)
        cls = getattr(torchvision.datasets, cls_name)
        try:
            train, test = cls(root, train=True, download=cfg.download), cls(root, train=False)
        except RuntimeError as e:
            raise UsageError(f"{cls_name} not found under {root} ({e}); pass --download to fetch it "
                             "(rank 0 downloads, the others wait) or point --data-dir at a copy") from None
        val = _as_tensors(test, mean, std)
        return DataBundle(_as_tensors(train, mean, std), val, CLASSIFICATION, 10,
                          tuple(val.x.shape[1:]), "cnn", test=val)
    return build


def _as_tensors(ds: Any, mean: Sequence[float], std: Sequence[float]) -> TensorData:
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # N,H,W or N,H,W,C -> N,C,H,W
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return TensorData((x.float() / 255 - m) / s, torch.as_tensor(ds.targets).long())


register("mnist")(_torchvision_set("MNIST", (0.1307,), (0.3081,)))
register("fashion-mnist")(_torchvision_set("FashionMNIST", (0.2860,), (0.3530,)))
register("cifar10")(_torchvision_set("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))


@register("imagefolder")
def imagefolder(cfg: FitConfig) -> DataBundle:
    """`--data-dir` with train/ and val/ (optionally test/) folders of one folder per class."""
    from torchvision import datasets, transforms

    root = _data_dir(cfg)
    splits = {}
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            if split == "test":
                continue
            raise UsageError(f"imagefolder: {root / split} is missing; --data-dir needs train/ and val/ "
                             "folders with one sub-folder of images per class")
        try:
            probe = datasets.ImageFolder(root / split)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"imagefolder: {root / split} has no usable images ({e})") from None
        size = probe[0][0].size[::-1]
        splits[split] = datasets.ImageFolder(root / split, transform=transforms.Compose(
            [transforms.Resize(size), transforms.ToTensor()]))
    train = splits["train"]
    shape = tuple(train[0][0].shape)
    return DataBundle(train, splits["val"], CLASSIFICATION, len(train.classes), shape, "resnet18",
                      test=splits.get("test"))


def _data_dir(cfg: FitConfig) -> Path:
    if not cfg.data_dir:
        raise UsageError(f"--data {cfg.data} reads files: pass --data-dir FOLDER")
    root = Path(cfg.data_dir)
    if not root.is_dir() and not cfg.download:
        raise UsageError(f"--data-dir {root} does not exist; create it, or pass --download")
    return root


def _user_data(cfg: FitConfig) -> DataBundle:
    fn = load_user_function(cfg.data, "--data")
    out = fn(cfg.data_dir)
    keys = {"train", "val", "task"}
    if not isinstance(out, dict) or not keys <= out.keys():
        raise UsageError(f"--data {cfg.data} must return a dict with keys train, val, task "
                         f"('classification' or 'regression') and num_outputs; got {type(out).__name__}")
    if out["task"] not in (CLASSIFICATION, REGRESSION):
        raise UsageError(f"--data {cfg.data}: task must be 'classification' or 'regression', "
                         f"got {out['task']!r}")
    try:
        sample = out["train"][0][0]
    except Exception as e:
        raise UsageError(f"--data {cfg.data}: train[0] must be an (input, target) pair ({e})") from None
    shape = tuple(sample.shape)
    if "num_outputs" not in out:
        raise UsageError(f"--data {cfg.data}: add num_outputs (classes, or regression targets) to the dict")
    return DataBundle(out["train"], out["val"], out["task"], int(out["num_outputs"]), shape,
                      "mlp" if len(shape) == 1 else "cnn", test=out.get("test"))


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through (mid-epoch resume) by skipping
    indices, never by loading and discarding data."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


class EvalChunkSampler(Sampler[list[int]]):
    """Splits the data set into fixed global chunks of `batch_size` and deals them round-robin to
    ranks: every sample is seen by exactly one rank, and each chunk is computed identically for
    any world size, so evaluation equals a single-process evaluation bit for bit."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.num_chunks = math.ceil(n / batch_size)

    def chunk_ids(self) -> range:
        return range(self.rank, self.num_chunks, self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for c in self.chunk_ids():
            yield list(range(c * self.batch_size, min((c + 1) * self.batch_size, self.n)))

    def __len__(self) -> int:
        return len(self.chunk_ids())


def train_loader(ds: Dataset, cfg: FitConfig, rank: int, world_size: int, cuda: bool) -> DataLoader:
    sampler = ResumableDistributedSampler(ds, num_replicas=world_size, rank=rank, seed=cfg.seed)
    common = _loader_args(ds, cfg, cuda)
    if isinstance(ds, TensorData):
        return DataLoader(ds, sampler=BatchSampler(sampler, cfg.batch_size, drop_last=False),
                          batch_size=None, **common)
    return DataLoader(ds, sampler=sampler, batch_size=cfg.batch_size, **common)


def eval_loader(ds: Dataset, batch_size: int, rank: int, world_size: int, workers: int,
                cuda: bool) -> DataLoader:
    chunks = EvalChunkSampler(len(ds), batch_size, rank, world_size)
    common = _loader_args(ds, None, cuda, workers)
    if isinstance(ds, TensorData):
        return DataLoader(ds, sampler=chunks, batch_size=None, **common)
    return DataLoader(ds, batch_sampler=chunks, **common)


def _loader_args(ds: Dataset, cfg: FitConfig | None, cuda: bool, workers: int | None = None) -> dict:
    workers = cfg.workers if cfg is not None else workers
    on_device = isinstance(ds, TensorData) and ds.x.device.type != "cpu"
    if on_device:
        workers = 0
    # An own generator: otherwise each iter() draws a worker seed from the global RNG, and a
    # resumed run (fresh iterator mid-epoch) would consume one draw more than an uninterrupted one.
    seed = cfg.seed if cfg is not None else 0
    return dict(num_workers=workers, pin_memory=cuda and not on_device, persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(seed))


def check_sizes(bundle: DataBundle, world_size: int) -> None:
    for name, ds in (("training", bundle.train), ("validation", bundle.val)):
        if len(ds) < world_size:
            raise UsageError(f"the {name} set has {len(ds)} samples but the job has {world_size} ranks; "
                             "use fewer processes or more data")
