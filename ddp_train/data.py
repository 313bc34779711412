"""The built-in data sets (a registry of builders), the in-memory `TensorData`, and the loaders."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import FitConfig, parse_shape
from .errors import UsageError
from .protocols import EpochSampler, SizedDataset
from .sampling import EvalChunks, PerSample, TrainSampler
from .streaming import is_stream, stream_loader
from .transforms import EpochIndexed, Keyed, SeededCollate, batch_hashes, image_transforms, padded_crop_flip
from .userfn import load_user_function, user_code

CLASSIFICATION, REGRESSION = "classification", "regression"


class TensorData(Dataset):
    """An in-memory data set. Indexing with a tensor of indices (or a slice) gathers a whole batch
    in one op per tensor, which the loaders use instead of per-sample __getitem__ + collate.
    `augment(x_batch, hashes)` augments training batches from per-sample hashes of (seed, epoch, index)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: Callable | None = None, seed: int = 0):
        self.x, self.y, self.augment, self.seed = x, y, augment, seed

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        epoch = None
        if isinstance(key, tuple):  # (epoch, indices) from the train sampler
            epoch, key = key
        if isinstance(key, list):
            key = torch.as_tensor(key)
        if isinstance(key, torch.Tensor) and key.device != self.x.device:
            # From pinned memory without blocking: a pageable copy would wait for the GPU every batch.
            key = (key.pin_memory() if self.x.is_cuda else key).to(self.x.device, non_blocking=True)
        x, y = self.x[key], self.y[key]
        if self.augment is not None and epoch is not None:
            index = key if isinstance(key, torch.Tensor) else torch.arange(len(self.x), device=x.device)[key]
            single = index.dim() == 0
            x = self.augment(x[None] if single else x, batch_hashes(self.seed, epoch, index.view(-1)))
            x = x[0] if single else x
        return x, y

    def to(self, device: torch.device) -> "TensorData":
        return TensorData(self.x.to(device), self.y.to(device), self.augment, self.seed)

    def with_augment(self, augment: Callable | None, seed: int) -> "TensorData":
        return TensorData(self.x, self.y, augment, seed)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    kind: str  # CLASSIFICATION or REGRESSION
    num_outputs: int
    input_shape: tuple[int, ...]
    default_model: str
    test: Dataset | None = None
    classes: list[str] | None = None  # class names, where the data set has them


DATASETS: dict[str, Callable[[FitConfig], DataBundle]] = {}
IMAGE_SIZE_SETS = ("imagefolder",)


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
    if cfg.image_size is not None and cfg.data not in IMAGE_SIZE_SETS:
        raise UsageError(f"--image-size applies to --data imagefolder; {cfg.data} keeps its own size")
    bundle = DATASETS[cfg.data](cfg)
    _check_labels(bundle, cfg.data)
    return bundle


def rank0_first(build: Callable[[], Any], download: bool, comm: Any) -> Any:
    """Collective: with --download, rank 0 builds (and fetches) first while the others wait."""
    if not (download and comm.active):
        return build()
    built: list = []
    comm.rank0(lambda: built.append(build()))  # returns None: no data set is broadcast
    return built[0] if built else build()


def _check_labels(bundle: DataBundle, source: str) -> None:
    """Class labels out of range fail deep inside cross_entropy: say so up front, for in-memory sets."""
    if bundle.kind != CLASSIFICATION:
        return
    for split, ds in (("train", bundle.train), ("val", bundle.val)):
        if isinstance(ds, TensorData) and len(ds):
            low, high = int(ds.y.min()), int(ds.y.max())
            if low < 0 or high >= bundle.num_outputs:
                raise UsageError(f"--data {source}: {split} labels run from {low} to {high}, but num_outputs is "
                                 f"{bundle.num_outputs}; labels must be 0..{bundle.num_outputs - 1} "
                                 "(raise num_outputs, or remap the labels)")


def _split(x: torch.Tensor, y: torch.Tensor, val_fraction: float) -> tuple[TensorData, TensorData]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_val = round(len(x) * val_fraction)
    return TensorData(x[perm[n_val:]], y[perm[n_val:]]), TensorData(x[perm[:n_val]], y[perm[:n_val]])


@register("digits")
def digits(cfg: FitConfig) -> DataBundle:
    """The 8x8 handwritten digits (1,797 images) shipped inside scikit-learn: no download."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
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
    if cfg.augment and len(shape) == 3:
        train = train.with_augment(padded_crop_flip, cfg.seed)
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


def _torchvision_set(cls_name: str, mean: Sequence[float], std: Sequence[float], flip: bool):
    def build(cfg: FitConfig) -> DataBundle:
        import torchvision

        root = _data_dir(cfg, downloadable=True)
        cls = getattr(torchvision.datasets, cls_name)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints each mirror it tries
                train, test = cls(root, train=True, download=cfg.download), cls(root, train=False)
        except (RuntimeError, OSError) as e:
            if cfg.download:  # no network, or the mirrors failed
                raise UsageError(f"{cls_name} could not be downloaded into {root} ({_first_line(e).rstrip(':')}); "
                                 "without a network, copy its files there by hand and drop --download") from None
            raise UsageError(f"{cls_name} not found under {root} ({_first_line(e)}); pass --download to fetch it "
                             "(rank 0 downloads, the others wait) or point --data-dir at a copy") from None
        val = _as_tensors(test, mean, std)
        train_set = _as_tensors(train, mean, std)
        if cfg.augment:
            train_set = train_set.with_augment(padded_crop_flip if flip else _padded_crop, cfg.seed)
        return DataBundle(train_set, val, CLASSIFICATION, 10, tuple(val.x.shape[1:]), "cnn", test=val,
                          classes=list(getattr(train, "classes", [])) or None)
    return build


def _padded_crop(x: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """Padded crop without the flip (digits and letters are not mirror-symmetric)."""
    return padded_crop_flip(x, hashes - hashes // 81 % 2 * 81, pad=2)


def _as_tensors(ds: Any, mean: Sequence[float], std: Sequence[float]) -> TensorData:
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)  # N,H,W or N,H,W,C -> N,C,H,W
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return TensorData((x.float() / 255 - m) / s, torch.as_tensor(ds.targets).long())


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


register("mnist")(_torchvision_set("MNIST", (0.1307,), (0.3081,), flip=False))
register("fashion-mnist")(_torchvision_set("FashionMNIST", (0.2860,), (0.3530,), flip=True))
register("cifar10")(_torchvision_set("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), flip=True))


@register("imagefolder")
def imagefolder(cfg: FitConfig) -> DataBundle:
    """`--data-dir` with train/ and val/ (optionally test/) folders of one folder per class, read
    from disk by the loader workers (never loaded whole). Training images get the random resized
    crop + flip recipe unless --no-augment; evaluation images are resized and centre-cropped."""
    from torchvision import datasets

    root = _data_dir(cfg, downloadable=False)
    size = cfg.image_size or 224
    augment = True if cfg.augment is None else cfg.augment
    splits = {}
    for split in ("train", "val", "test"):
        if not (root / split).is_dir():
            if split == "test":
                continue
            raise UsageError(f"imagefolder: {root / split} is missing; --data-dir needs train/ and val/ "
                             "folders with one sub-folder of images per class")
        try:
            splits[split] = datasets.ImageFolder(root / split, transform=image_transforms(size, split == "train", augment))
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f"imagefolder: {root / split} has no usable images ({e})") from None
    train = splits["train"]
    if splits["val"].classes != train.classes:
        raise UsageError(f"imagefolder: val/ has classes {splits['val'].classes} but train/ has {train.classes}; "
                         "both need the same class folders")
    return DataBundle(train, splits["val"], CLASSIFICATION, len(train.classes), (3, size, size), "resnet18",
                      test=splits.get("test"), classes=list(train.classes))


def _data_dir(cfg: FitConfig, downloadable: bool) -> Path:
    if not cfg.data_dir:
        raise UsageError(f"--data {cfg.data} reads files: pass --data-dir FOLDER")
    root = Path(cfg.data_dir)
    if not root.is_dir() and not (downloadable and cfg.download):
        fix = "create it, or pass --download" if downloadable else "point it at a folder with train/ and val/"
        raise UsageError(f"--data-dir {root} does not exist; {fix}")
    return root


def _user_data(cfg: FitConfig) -> DataBundle:
    fn = load_user_function(cfg.data, "--data")
    with user_code("--data", cfg.data, "loading the data"):
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
        raise UsageError(f"--data {cfg.data}: train[0] must be an (input, target) pair ({e}); for other "
                         "sample structures write a Task (see the README, 'Your own model')") from None
    shape = tuple(sample.shape)
    if "num_outputs" not in out:
        raise UsageError(f"--data {cfg.data}: add num_outputs (classes, or regression targets) to the dict")
    bundle = DataBundle(out["train"], out["val"], out["task"], int(out["num_outputs"]), shape,
                        "cnn" if len(shape) == 3 else "mlp", test=out.get("test"), classes=out.get("classes"))
    _check_labels(bundle, cfg.data)
    return bundle


def train_loader(ds: Dataset, batch_size: int, rank: int, world_size: int, seed: int, workers: int | None,
                 cuda: bool, global_batch: int | None = None,
                 collate: Callable | None = None) -> tuple[Iterable, EpochSampler]:
    """The training loader and its sampler (set_epoch / start batch). In-memory sets are gathered a
    batch at a time; any other set (or any set with the Task's `collate`) is read per sample under
    seeds of (seed, epoch, index), and collated under a seed of (seed, epoch, first index)."""
    common = _loader_args(ds, workers, cuda, seed)
    if is_stream(ds):  # each epoch's workers are new: they get the epoch and position to start from
        return stream_loader(ds, batch_size, rank, world_size, {**common, "persistent_workers": False}, collate)
    sized = cast(SizedDataset, ds)  # map-style: not a stream
    sampler = TrainSampler(len(sized), batch_size, rank, world_size, seed, global_batch)
    if isinstance(ds, TensorData) and collate is None:
        return _batches(ds, sampler, common), sampler
    return _per_sample(EpochIndexed(sized, seed), PerSample(sampler), collate, seed, common), sampler


def eval_loader(ds: Dataset, batch_size: int, rank: int, world_size: int, workers: int | None,
                cuda: bool, collate: Callable | None = None, seed: int | None = None) -> tuple[Iterable, EvalChunks]:
    """Fixed chunks of sample indices. With a `seed`, samples are read under seeds of (seed, index),
    and the Task's `collate` runs under a seed of (seed, the chunk's first index); None: unseeded
    (for data that draws nothing: the seeding costs ~0.1-0.5 ms per sample)."""
    in_memory = isinstance(ds, TensorData) and collate is None
    sized = cast(SizedDataset, ds)  # check_sizes refused a stream
    chunks = EvalChunks(len(sized), batch_size, rank, world_size, as_lists=not in_memory)
    common = _loader_args(ds, workers, cuda, 0)
    if isinstance(ds, TensorData) and collate is None:
        return _batches(ds, chunks, common), chunks
    return _per_sample(ds if seed is None else EpochIndexed(sized, seed), chunks, collate, seed, common), chunks


def _per_sample(ds: Dataset, batches: Sampler, collate: Callable | None, seed: int | None,
                common: dict) -> DataLoader:
    if collate is None:
        return DataLoader(ds, batch_sampler=batches, **common)
    if seed is None:
        return DataLoader(ds, batch_sampler=batches, collate_fn=collate, **common)
    return DataLoader(Keyed(cast(SizedDataset, ds)), batch_sampler=batches, collate_fn=SeededCollate(collate, seed), **common)


def _batches(ds: TensorData, sampler: TrainSampler | EvalChunks, common: dict) -> Iterable:
    """In-memory batches: a DataLoader when it has work to do (worker processes, pinned memory),
    else the gathered batches as it would yield them, without its per-iterator and per-batch
    machinery (~60 us per epoch and more per batch: a few % of a small model's step)."""
    if common["num_workers"] or common["pin_memory"]:
        return DataLoader(ds, sampler=sampler, batch_size=None, **common)
    return InMemoryBatches(ds, sampler)


class InMemoryBatches:
    """`[x, y]` per sampler key, a list as DataLoader's default_convert makes it."""

    def __init__(self, dataset: TensorData, sampler: TrainSampler | EvalChunks):
        self.dataset, self.sampler = dataset, sampler

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        dataset = self.dataset
        return (list(dataset[key]) for key in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def default_workers(data: str, cuda: bool, local_world_size: int) -> int:
    """Loader workers when --workers is not given: for --data imagefolder on GPU, JPEG decoding and
    augmentation run in up to 8 worker processes per rank (one CPU left to each training process);
    in-memory and CPU runs read in the training process."""
    if data != "imagefolder" or not cuda:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // max(local_world_size, 1) - 1))


def _loader_args(ds: Dataset, workers: int | None, cuda: bool, seed: int) -> dict:
    on_device = isinstance(ds, TensorData) and ds.x.device.type != "cpu"
    if on_device or workers is None:
        workers = 0
    # An own generator: otherwise each iter() draws a worker seed from the global RNG, and a
    # resumed run (fresh iterator mid-epoch) would consume one draw more than an uninterrupted one.
    return dict(num_workers=workers, pin_memory=cuda and not on_device, persistent_workers=workers > 0,
                generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_ctrl_c if workers else None)


def _ignore_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: the main process stops the run at a
    step boundary, and its loader workers must live until then (they end with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_sizes(splits: dict[str, Any], world_size: int) -> None:
    if is_stream(splits["val"]):
        raise UsageError("the validation set is a stream (an IterableDataset): exact evaluation splits it by sample "
                         "index; give a map-style data set (__len__ and __getitem__) for 'val'")
    for split, name in (("train", "training"), ("val", "validation")):
        ds = splits[split]
        if isinstance(ds, DataLoader):
            raise UsageError(f"the {split} split is a DataLoader; return its data set (loader.dataset) and give its "
                             f"collate_fn from Task.collate(split): ddp_train builds the loaders, to shard and resume them")
        if is_stream(ds):
            continue
        if len(ds) == 0:
            raise UsageError(f"the {name} set is empty: the data's {split!r} split has 0 samples; check where the "
                             "data comes from (its path, download, filter or split)")
        if len(ds) < world_size:
            raise UsageError(f"the {name} set has {len(ds)} samples but the job has {world_size} ranks; "
                             "use fewer processes or more data")
