"""The user's own code: loading `package.module:name` (or `path/file.py:name`), and turning an
exception raised inside it into one clear error that shows only the user's frames."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .errors import UsageError

# Frames from these packages are the framework's, not the user's: hidden unless --debug.
FRAMEWORK = ("ddp_train", "torch", "typer", "click", "torchvision", "torchmetrics")


def _framework_dirs() -> tuple[str, ...]:
    """Where the framework's packages were imported from: matched as folders, not by name, so a
    checkout or venv in a folder named `ddp_train` or `torch` still shows the user's own frames."""
    dirs = []
    for name in FRAMEWORK:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path:
            dirs.append(os.path.join(os.path.dirname(os.path.realpath(path)), ""))
    return tuple(dirs)


class UserCodeError(UsageError):
    """An exception raised inside the user's --data/--model/--task code. `details` holds the user's
    frames of the traceback, which the command line prints above the one `error:` line."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def load_user_object(spec: str, option: str) -> Any:
    """`package.module:name` or `path/to/file.py:name` -> the named object."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"{option} {spec!r}: write it as package.module:name or path/to/file.py:name")
    if "" not in sys.path:
        sys.path.insert(0, "")  # console scripts do not put the working directory on the path
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name), option, spec)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UsageError(f"{option} {spec!r}: cannot import {module_name} ({e}); check the name and "
                             "that it is on PYTHONPATH") from None
        except Exception as e:
            raise user_error(e, option, spec, "importing it") from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise UsageError(f"{option} {spec!r}: {module_name} has no {attr!r}")
    return obj


def load_user_function(spec: str, option: str) -> Any:
    fn = load_user_object(spec, option)
    if not callable(fn):
        raise UsageError(f"{option} {spec!r}: {spec.rpartition(':')[0]}.{spec.rpartition(':')[2]} is not callable")
    return fn


def _import_file(path: Path, option: str, spec: str) -> Any:
    if not path.is_file():
        raise UsageError(f"{option} {spec!r}: {path} does not exist; if the code moved, name the file where it "
                         "is now (a run continues with its Task named from anywhere)")
    name = f"ddp_train_user_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(path.resolve().parent))  # the file's own imports of its neighbours
    module_spec = importlib.util.spec_from_file_location(name, path)
    # A path (not a package name) always yields a spec with a source loader.
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise user_error(e, option, spec, "importing it") from e
    return module


def user_frames(e: BaseException) -> str:
    """The traceback of `e` without the framework's frames: what the user can act on."""
    framework = _framework_dirs()
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not os.path.realpath(f.filename).startswith(framework) and "<frozen" not in f.filename]
    if not frames:
        return ""
    return "Traceback (your code only; --debug shows all frames):\n" + "".join(traceback.format_list(frames))


def user_error(e: BaseException, option: str, spec: str | None, doing: str, hint: str = "") -> UserCodeError:
    what = f"{option} {spec}" if spec else option
    first = str(e).splitlines()[0] if str(e) else ""
    message = f"{what} raised {type(e).__name__} while {doing}: {first}".rstrip(": ")
    return UserCodeError(f"{message}; {hint}" if hint else message, user_frames(e))


# A DataLoader worker's exception reaches the main process with the worker's traceback as text.
_WORKER_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def where(e: BaseException) -> str:
    """`file:line` of the innermost user frame that raised `e` (in a loader worker too), or ''."""
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)]
    if "DataLoader worker" in str(e):
        frames += [(name, int(line)) for name, line in _WORKER_FRAME.findall(str(e))]
    mine = [f"{name}:{line}" for name, line in frames
            if not any(part in name for part in FRAMEWORK) and "<frozen" not in name]
    return mine[-1] if mine else ""


def data_error(e: BaseException, option: str, doing: str) -> UserCodeError:
    """One line for a failure while making batches (the data set's __getitem__, the Task's collate),
    naming the user's frame; a loader worker's error by its original exception."""
    text = str(e)
    if "DataLoader worker" in text and "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1]  # 'ValueError: ...', the worker's own exception
    at = where(e)
    first = text.splitlines()[0] if text else type(e).__name__
    return UserCodeError(f"{option} raised {type(e).__name__} while {doing}{f' at {at}' if at else ''}: {first}",
                         user_frames(e))


def first_step_hint(e: BaseException) -> str:
    """What a first-step failure most likely is, from its message and frames."""
    text = str(e)
    frames = traceback.extract_tb(e.__traceback__)
    if "deterministic implementation" in text:
        return "this model uses an operation without a deterministic kernel on this device: drop " \
               "--deterministic, or replace that layer"
    if any("/torch/optim/" in f.filename for f in frames):
        return "the optimizer failed on the first step: check its parameters and options (Task.optimizer)"
    if _DTYPE.search(text):
        return "a dtype mismatch: give the model inputs of its parameters' dtype (autocast handles --precision) " \
               "and the loss the target dtype it expects (class indices as int64 for cross-entropy)"
    if _SHAPE.search(text):
        return "make the model fit the batch's shapes"
    return ""


_DTYPE = re.compile(r"dtype|scalar type|expected (both|all) |Float|Half|BFloat16|Long but|Int but|Double", re.I)
_SHAPE = re.compile(r"shape|size mismatch|must match the size|size of tensor|mat\d and mat\d|batch_size|"
                    r"dimension|out of bounds|expected input|Given groups|cannot be multiplied|expanded size|"
                    r"view size", re.I)


class NamedErrors:
    """An iterable of batches (a loader) whose errors while making a batch become `on_error(e)`."""

    def __init__(self, batches: Any, on_error: Callable[[BaseException], BaseException]):
        self.batches, self.on_error = batches, on_error

    def __getattr__(self, name: str) -> Any:  # the loader's dataset, collate_fn, ...
        return getattr(self.__dict__["batches"], name)

    def __iter__(self) -> Iterator[Any]:
        return user_batches(self.batches, self.on_error)

    def __len__(self) -> int:
        return len(self.batches)


def user_batches(batches: Iterable[Any], on_error: Callable[[BaseException], BaseException]) -> Iterator[Any]:
    """`batches`, with an exception raised while making one (not ours) turned into `on_error(e)`."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UsageError:
            raise
        except Exception as e:
            raise on_error(e) from e
        yield batch


@contextlib.contextmanager
def user_code(option: str, spec: str | None, doing: str = "building it") -> Iterator[None]:
    """Exceptions raised by the user's code inside this block become one UserCodeError."""
    try:
        yield
    except UsageError:
        raise
    except Exception as e:
        raise user_error(e, option, spec, doing) from e
