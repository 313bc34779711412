"""Reading a sharded (DCP) checkpoint without running code from it.

DCP's FileSystemReader unpickles `.metadata` with plain `pickle.load`, and its load planners read
non-tensor entries with `torch.load(weights_only=False)`: a crafted checkpoint runs code on open.
`SafeReader` unpickles the metadata with an allow-list (DCP's own metadata classes, torch sizes,
dtypes and layouts, paths, plain types) and checks that every storage entry points at a shard file
of the checkpoint; the planners load non-tensor entries with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader, metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem

from ..errors import UsageError, pickle_refusal

_ALLOWED = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("pathlib", "PosixPath"): pathlib.PurePosixPath,  # a name only: no file system access
    ("pathlib", "Path"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    ("collections", "OrderedDict"): dict,
}
_METADATA_CLASSES = ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                     "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch.distributed.checkpoint.metadata" and name in _METADATA_CLASSES:
            return getattr(metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata(path: Path) -> metadata.Metadata:
    """`path/.metadata`, unpickled with the allow-list and checked: shard entries name files of `path`."""
    try:
        with open(path / ".metadata", "rb") as f:
            md = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise pickle_refusal(path / ".metadata", f"global {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise UsageError(f"{path / '.metadata'} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(md, metadata.Metadata) or not isinstance(md.storage_data, dict):
        raise UsageError(f"{path / '.metadata'} is not DCP metadata")
    files = {p.name for p in path.iterdir() if p.suffix == ".distcp"}
    for info in md.storage_data.values():
        if not isinstance(info, _StorageInfo) or info.relative_path not in files:
            raise UsageError(f"{path / '.metadata'} points outside the checkpoint's shard files")
    return md


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through `read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise UsageError(f"{self.path}: per-rank DCP metadata is not a ddp_train checkpoint")
        md = read_metadata(Path(self.path))
        md.storage_meta = md.storage_meta or metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


def _load_bytes(read_item: ReadItem, value: io.BytesIO) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise pickle_refusal(Path(f"entry {read_item.dest_index.fqn} of a shard file"),
                      f"global {found.group(1) if found else '?'}") from None


@contextlib.contextmanager
def refusals(path: Path) -> Iterator[None]:
    """DCP wraps a reader's error in a CheckpointException (a BaseException): give ours back, and
    any other failure to read as one line."""
    try:
        yield
    except CheckpointException as e:
        errors = [exc for exc, _ in e.failures.values()]
        raise next((x for x in errors if isinstance(x, UsageError)), None) or UsageError(
            f"sharded checkpoint {path} is unreadable ({type(errors[0]).__name__ if errors else 'unknown'}: "
            f"{str(errors[0]).splitlines()[0][:200] if errors else ''})") from None


class _SafeBytes:
    # DefaultLoadPlanner's, which this mixin precedes
    flatten_state_dict: bool
    original_state_dict: Any
    mappings: Any
    state_dict: Any

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = _load_bytes(read_item, value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_SafeBytes, DefaultLoadPlanner):
    """DefaultLoadPlanner reading non-tensor entries with weights_only=True."""


class SafeEmptyPlanner(_SafeBytes, _EmptyStateDictLoadPlanner):
    """The planner that rebuilds a state dict from the metadata, reading non-tensor entries safely."""
