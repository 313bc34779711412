"""A CPU run keeps large blocks in the heap (glibc's mmap threshold raised), unless the user set
glibc's malloc variables. Checked in fresh interpreters through glibc's own accounting (mallinfo2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ddp_train.cpu_malloc import keep_large_blocks, user_tuned

from conftest import ROOT, base_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# Prints how many blocks glibc holds as separate mappings after a 48 MiB malloc: above glibc's
# largest dynamic mmap threshold (32 MiB), so 1 under its defaults and 0 once the threshold is raised.
PROBE = """
import ctypes
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks fsmblks "
                                               "uordblks fordblks keepcost").split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
block = libc.malloc(48 << 20)
print("mmapped", libc.mallinfo2().hblks - before)
"""


def mapped_blocks(setup: str, **env: str) -> int:
    out = subprocess.run([sys.executable, "-c", setup + PROBE], capture_output=True, text=True, timeout=240,
                         env=base_env(**env), cwd=ROOT, check=True).stdout
    return int(out.split("mmapped ")[-1])


def test_large_blocks_come_from_the_heap_once_set():
    assert mapped_blocks("") == 1
    assert mapped_blocks("from ddp_train.cpu_malloc import keep_large_blocks\nassert keep_large_blocks()\n") == 0


def test_a_cpu_fit_sets_it_and_the_users_own_setting_wins(tmp_path):
    def run(name: str) -> str:
        return ("from ddp_train import fit\n"
                f"fit(data='linreg', samples=256, val_samples=64, epochs=1, progress=False, "
                f"run_dir={str(tmp_path / name)!r})\n")

    assert mapped_blocks(run("ours")) == 0
    assert mapped_blocks(run("users"), MALLOC_ARENA_MAX="2", MALLOC_TRIM_THRESHOLD_="131072") == 1


@pytest.mark.parametrize("env, tuned", [
    ({}, False),
    ({"MALLOC_ARENA_MAX": "2"}, False),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, True),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, False),
])
def test_user_tuned(env, tuned):
    assert user_tuned(env) is tuned
    if tuned:
        assert keep_large_blocks(env) is False
