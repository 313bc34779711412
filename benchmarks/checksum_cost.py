"""What the checkpoint checksum costs, against loading the checkpoint: a 1 GB checkpoint dict
(float32 tensors) written once with ddp_train's sealed atomic save, then, from the page cache,
`torch.load(weights_only=True)` alone versus the CRC-32 verification that ddp_train's reader runs
first (integrity.check_plain), and the atomic save with and without the running checksum (the
saves are dominated by the disk: on a shared machine they vary several-fold between rounds).
Also zlib.adler32, hashlib.blake2b and (where installed) xxhash's xxh3 over the same bytes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checksum_cost.py [--gb 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import torch

import common  # noqa: F401  (puts the checkout's ddp_train on sys.path)
from ddp_train import checkpoint, integrity
from ddp_train.checkpoint.atomic import fsync_dir


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hash_file(path: Path, update) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            update(block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="Folder to write in (default: a temporary folder).")
    args = parser.parse_args()
    tensors = max(1, round(args.gb * 16))
    numel = int(args.gb * 2**30 / 4 / tensors)
    state = {"version": checkpoint.FORMAT_VERSION, "step": 1, "checksum": integrity.ALGORITHM,
             "model": {f"layer{i}.weight": torch.randn(numel) for i in range(tensors)}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path, plain = Path(tmp) / "last.pt", Path(tmp) / "plain.pt"

        def save_plain() -> None:  # atomic_save without the checksum: temp file, fsync, rename, fsync the folder
            tmp = plain.with_name(".plain.pt.tmp")
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, plain)
            fsync_dir(plain.parent)

        saves: dict[str, list[float]] = {"sealed": [], "unsealed": []}
        checkpoint.atomic_save(state, path)  # warm-up: the first write of a new file pays for the disk's blocks
        save_plain()
        for _ in range(args.repeats):  # interleaved, so that both see the same machine
            saves["sealed"].append(timed(lambda: checkpoint.atomic_save(state, path), 1))
            saves["unsealed"].append(timed(save_plain, 1))
        save_sealed, save_unsealed = (statistics.median(saves[k]) for k in ("sealed", "unsealed"))
        plain.unlink()
        size = path.stat().st_size
        assert integrity.check_plain(path) == "ok"
        torch.load(path, weights_only=True)  # into the page cache
        load = timed(lambda: torch.load(path, map_location="cpu", weights_only=True), args.repeats)
        verify = timed(lambda: integrity.check_plain(path), args.repeats)
        full = timed(lambda: checkpoint.load(path), args.repeats)
        others = {
            "adler32": timed(lambda: hash_file(path, lambda b: zlib.adler32(b)), args.repeats),
            "blake2b": timed(lambda: hash_file(path, hashlib.blake2b().update), args.repeats),
        }
        try:  # not a dependency: measured where installed, as the faster alternative
            import xxhash
            others["xxh3_64"] = timed(lambda: hash_file(path, xxhash.xxh3_64().update), args.repeats)
        except ImportError:
            pass
    result = {
        "bytes": size, "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_s": round(load, 3), "crc32_verify_s": round(verify, 3),
        "verify_vs_load": round(verify / load, 3),
        "checkpoint_load_with_verify_s": round(full, 3),
        "save_unsealed_s": round(save_unsealed, 3), "save_sealed_s": round(save_sealed, 3),
        "crc32_gbs": round(size / verify / 1e9, 2),
        **{f"{k}_s": round(v, 3) for k, v in others.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
