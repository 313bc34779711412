"""The user's own code: loading `package.module:name` (or `path/file.py:name`), and turning an
exception raised inside it into one clear error that shows only the user's frames."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

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


@contextlib.contextmanager
def user_code(option: str, spec: str | None, doing: str = "building it") -> Iterator[None]:
    """Exceptions raised by the user's code inside this block become one UserCodeError."""
    try:
        yield
    except UsageError:
        raise
    except Exception as e:
        raise user_error(e, option, spec, doing) from e
