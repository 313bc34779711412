"""Process-group lifetime, collectives that are no-ops on one process, and the failure watchdog.

Every method of `Comm` is a collective unless it says otherwise: call it on all ranks.
"""

from __future__ import annotations

import _io
import atexit
import contextlib
import gc
import io
import ipaddress
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .distenv import DistEnv, is_loopback
from .errors import AgreedError, PeerFailure, WriteFailure
from .stopvote import StopVote
from .watchdog import ABORT_KEY, Watchdog



class Comm:
    """Collectives over the job. Control-plane traffic (flags, objects) uses a CPU gloo group so
    that asking "does any rank want to stop?" never synchronises a GPU stream."""

    def __init__(self, env: DistEnv, control: Any = None, store: Any = None):
        self.env = env
        self.abort_key = ABORT_KEY
        self.step = 0  # this rank's optimizer steps, for its heartbeat (see at_step)
        self._control = control
        self._store = store
        self._votes = StopVote(control)

    @property
    def active(self) -> bool:
        return self.env.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self._control)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a tensor on the training device."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return bool(t.item())

    def vote_any(self, flag: bool) -> bool:
        """Record this rank's `flag` (call once per optimizer step, on every rank); True on every
        rank, at the same step, once any rank has passed True: within about 0.4 s or two steps.
        Costs no wait: the answer travels on the control group while steps compute, and only
        every few steps (ddp_train/stopvote.py)."""
        if not self.active:
            return flag
        return self._votes.vote(flag)

    def end_votes(self) -> None:
        """Wait for a vote in flight, so that no collective outlives the loop."""
        if self.active:
            self._votes.end()

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self._control)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.env.world_size if self.env.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._control)
        return out

    def rank0(self, fn, *args: Any) -> Any:
        """Run `fn` on rank 0 only and give its result, or its exception, to every rank."""
        result: tuple[bool, Any] = (True, None)
        if self.env.is_main:
            try:
                result = (True, fn(*args))
            except Exception as e:  # re-raised on every rank below
                result = (False, e)
        ok, value = self.broadcast_object(result)
        if not ok:
            raise value
        return value

    def at_step(self, step: int) -> None:
        """Not a collective: record this rank's progress (named if it ever hangs)."""
        self.step = step

    def close(self) -> None:
        """Not a collective: drop this object's hold on the control group and the store, so that
        destroying the groups frees them here, in the calling thread."""
        self.end_votes()
        self._control = self._store = self._votes.group = None

    def announce_failure(self, message: str) -> None:
        """Not a collective: tell the other ranks' watchdogs that this rank is going down."""
        if self._store is None or not self.active:
            return
        with contextlib.suppress(Exception):
            self._store.set(self.abort_key, f"rank {self.env.rank}: {message}")
            time.sleep(1.0)  # let the watchdogs read it before this rank's sockets close

    def all_failed(self, what: str, wait_s: float = 5.0) -> bool:
        """Not a collective: call it on each rank where `what` failed. True when every rank reports
        the same failure within `wait_s` (the error is then agreed: rank 0 alone reports it); False
        where some rank did not fail, e.g. an out-of-memory on one GPU only (the error is this rank's)."""
        if not self.active:
            return True
        if self._store is None:
            return False
        key, world = f"ddp_train/failed/{what}", self.env.world_size
        try:
            failed = self._store.add(key, 1)
            deadline = time.monotonic() + wait_s
            while failed < world and time.monotonic() < deadline:
                time.sleep(0.05)
                failed = self._store.add(key, 0)
        except Exception:  # the store is gone: another rank has ended already
            return False
        return failed >= world

    def peer_failure(self) -> str | None:
        """Not a collective: the failure another rank announced, if any."""
        if self._store is None:
            return None
        with contextlib.suppress(Exception):
            if self._store.check([self.abort_key]):
                return self._store.get(self.abort_key).decode()
        return None


@contextlib.contextmanager
def distributed(env: DistEnv, timeout_s: float, hang_s: float = 45.0) -> Iterator[Comm]:
    """Initialise the process group (if several processes), yield a `Comm`, tear down cleanly.
    A rank silent for `hang_s` seconds (0: never) ends the job (ddp_train/watchdog.py).

    On an exception the group is not destroyed (that could wait on a dead peer): the process exits.
    """
    _quick_interpreter_exit()
    if not env.distributed:
        yield Comm(env)
        return
    timeout = timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {}
    if env.backend == "nccl":
        kwargs["device_id"] = torch.device(env.device)
        torch.cuda.set_device(kwargs["device_id"])  # before NCCL sees the group, as torch's examples do
    dist.init_process_group(env.backend, store=_store(env, timeout), rank=env.rank,
                            world_size=env.world_size, timeout=timeout, **kwargs)
    # Flags and objects travel in a CPU group of their own: they never wait behind the gradient
    # all-reduce in the training group's queue, nor synchronise a GPU stream.
    store = _store(env, timedelta(seconds=30), client=True)
    watchdog = Watchdog(store, env, hang_s, timeout_s)
    watchdog.beat()  # before the group: every rank's first heartbeat is in the store once it exists
    control = dist.new_group(backend="gloo", timeout=timeout)
    comm = Comm(env, control, store)
    watchdog.step = lambda: comm.step
    watchdog.start()
    try:
        yield comm
    except BaseException as e:
        watchdog.stop()
        if not isinstance(e, (PeerFailure, AgreedError, SystemExit, KeyboardInterrupt)):
            said = str(e) if isinstance(e, WriteFailure) else f"{type(e).__name__}: {e}"
            comm.announce_failure(said.splitlines()[0][:500])
        raise
    comm.barrier()
    # The watchdog must be gone before the groups are: if its thread dropped the last reference to
    # the Comm (and with it a process group) while the interpreter exits, the group's destructor
    # would release the GIL in a thread that Python then ends, and the process aborts
    # ("terminate called without an active exception"). Joined, it wakes at once from its wait.
    watchdog.stop()
    comm.close()
    dist.destroy_process_group(control)
    dist.destroy_process_group()


def _quick_interpreter_exit() -> None:
    """At interpreter exit, freeze the garbage collector's ~1M tracked objects (most of them
    torch's), so that the exit's final collections do not walk them: with torch imported they take
    ~0.3 s of the ~0.45 s an exit costs, on every rank. Objects that reference counting frees are
    still finalised as usual (files are flushed and closed); only objects left in reference cycles
    at exit go to the OS unfinalised, which Python does not promise to finalise anyway. atexit
    handlers registered earlier (logging's flush) or later (wandb's) all still run."""
    global _exit_freeze_registered
    if not _exit_freeze_registered:
        _exit_freeze_registered = True
        atexit.register(gc.freeze)


_exit_freeze_registered = False
_IOBASE = _io._IOBase  # the C base of every file object (io.IOBase is an ABC over it)


def exit_process(code: int) -> None:
    """Not a collective: end this process with exit status `code`, without the interpreter's
    teardown (0.1-0.4 s with torch loaded, on every rank, before a launcher sees the exit).

    Nothing the normal exit would save is lost: if another non-daemon thread is alive (a normal
    exit would wait for it) this is a plain `sys.exit`. Otherwise the atexit handlers run (logging's
    flush, wandb's, multiprocessing's join of child processes, weakref finalizers such as temporary
    directories), then every file object still open is closed, wrappers before what they wrap
    (what the interpreter's teardown would do for files held by live objects), the standard
    streams are flushed, and the process ends with `os._exit(code)`. What is skipped: `__del__`
    methods other than files' and C++ static destructors (nothing to save: the process groups
    are destroyed by `distributed`)."""
    main = threading.main_thread()
    if threading.current_thread() is not main or any(
            t.is_alive() and not t.daemon and t is not main for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    gc.unfreeze()  # the exit handler froze them; get_objects() lists only unfrozen objects
    std = {id(f) for s in (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)
           if s is not None for f in (s, getattr(s, "buffer", None), getattr(getattr(s, "buffer", None), "raw", None))}
    files = [o for o in gc.get_objects() if _IOBASE in type(o).__mro__ and id(o) not in std]
    # Text wrappers, then other Python-level files (gzip, ...), then buffers, then raw files.
    rank: dict[type, int] = {io.TextIOWrapper: 0, io.BufferedWriter: 2, io.BufferedRandom: 2, io.BufferedReader: 2,
            io.BufferedRWPair: 2, io.FileIO: 3}
    for f in sorted(files, key=lambda f: rank.get(type(f), 1)):
        with contextlib.suppress(Exception):
            if not f.closed:
                f.close()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(code)


def _store(env: DistEnv, timeout: timedelta, client: bool = False) -> Any:
    """The job's key-value store, under a prefix per restart attempt: torchrun's agent store outlives
    a restart, and without the prefix the new workers read the old ones' addresses and hang."""
    host = env.is_main and not env.agent_store and not client
    listen = _listen_socket(env) if host else None
    tcp = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=host, timeout=timeout,
                        wait_for_workers=False, master_listen_fd=listen.detach() if listen else None)
    return dist.PrefixStore(f"ddp_train/attempt_{env.restart_count}", tcp)


def bind_address(env: DistEnv) -> tuple[socket.AddressFamily, str] | None:
    """Not a collective: where rank 0's store listens. The address MASTER_ADDR resolves to here
    (the one every rank dials), so a job named on 127.0.0.1 is not reachable from the network;
    None (all interfaces, TCPStore's own choice) where that would shut out the other nodes: a
    multi-node job whose master name resolves to loopback on its own host (Debian maps the host
    name to 127.0.1.1), or a name that cannot be resolved."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(env.master_addr, env.master_port,
                                                       type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError):
        return None
    spans_nodes = env.local_world_size < env.world_size
    if ipaddress.ip_address(sockaddr[0]).is_loopback and spans_nodes and not is_loopback(env.master_addr):
        return None
    return family, str(sockaddr[0])  # an IP address already: typeshed allows an int for other families


def _listen_socket(env: DistEnv) -> socket.socket | None:
    """A socket listening on `bind_address` for TCPStore to serve on, or None for TCPStore's own."""
    address = bind_address(env)
    if address is None:
        return None
    sock = socket.socket(address[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address[1], env.master_port))
        sock.listen(socket.SOMAXCONN)
    except OSError:  # in use: TCPStore's own attempt reports it; not local (NAT): all interfaces
        sock.close()
        return None
    return sock
