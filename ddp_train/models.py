"""Model registry: built-in nets, any torchvision classifier by name, or the user's own."""

from __future__ import annotations

import difflib
import inspect
import math
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from .errors import UsageError
from .userfn import load_user_function, user_code

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn
    return wrap


@register("mlp")
def mlp(input_shape: tuple[int, ...], num_outputs: int, hidden: tuple[int, ...] = (128, 64)) -> nn.Module:
    widths = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], num_outputs))


@register("cnn")
def cnn(input_shape: tuple[int, ...], num_outputs: int, **_) -> nn.Module:
    """The classic MNIST CNN of the PyTorch tutorials (53,994 parameters for 1 channel, 10 classes)."""
    if len(input_shape) != 3:
        raise UsageError(f"--model cnn needs image input C,H,W; this data is {input_shape}")
    return _named(
        ("conv1", nn.Conv2d(input_shape[0], 32, kernel_size=3)), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, kernel_size=5)), ("pool2", nn.MaxPool2d(2)),
        ("dropout", nn.Dropout2d(p=0.1)), ("adaptive_pool", GlobalMaxPool()),
        ("flatten", nn.Flatten()), ("linear1", nn.Linear(64, 32)), ("relu", nn.ReLU()),
        ("linear2", nn.Linear(32, num_outputs)))


class GlobalMaxPool(nn.Module):
    """nn.AdaptiveMaxPool2d((1, 1)) as a max over height and width: the same output, and a
    backward that has a deterministic CUDA kernel (AdaptiveMaxPool2d's has none, so
    --deterministic would stop at the first step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3), keepdim=True)


def _named(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


@register("linear")
def linear(input_shape: tuple[int, ...], num_outputs: int, **_) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


def build_model(name: str, input_shape: tuple[int, ...], num_outputs: int,
                hidden: tuple[int, ...] = (128, 64), pretrained: bool = False) -> nn.Module:
    if pretrained and (name in MODELS or ":" in name):
        raise UsageError(f"--pretrained loads torchvision's weights; --model {name} has none (drop --pretrained)")
    if name in MODELS:
        return MODELS[name](input_shape, num_outputs, hidden=hidden)
    if ":" in name:
        return _user_model(name, input_shape, num_outputs)
    if pretrained:
        return _pretrained(name, input_shape, num_outputs)
    return _torchvision_model(name, input_shape, num_outputs)


def _pretrained(name: str, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """torchvision's default weights, from the local torch hub cache; a new last layer when the
    number of classes differs from the weights'."""
    import torch
    import torchvision.models as tvm

    _check_torchvision(name, input_shape)
    weights = tvm.get_model_weights(name).DEFAULT
    cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
    try:
        model = tvm.get_model(name, weights=weights)
    except Exception as e:  # no network: urllib's URLError, or a half-downloaded file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--pretrained: {name}'s weights are not in the torch hub cache ({cache}) and could not "
                         f"be downloaded ({first}); copy the file there (TORCH_HOME moves the cache), or drop "
                         "--pretrained") from None
    last_name, last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if last.out_features != num_outputs:
        parent = model.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else model
        setattr(parent, last_name.rpartition(".")[2], nn.Linear(last.in_features, num_outputs))
    return model


def _torchvision_model(name: str, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    import torchvision.models as tvm

    _check_torchvision(name, input_shape)
    return tvm.get_model(name, weights=None, num_classes=num_outputs)


def _check_torchvision(name: str, input_shape: tuple[int, ...]) -> None:
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        close = difflib.get_close_matches(name.lower(), [*MODELS, *known], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown model {name!r}{hint}; choose {', '.join(MODELS)}, a torchvision "
                         "classification model (e.g. resnet18, resnet50, vit_b_16), or package.module:function")
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise UsageError(f"torchvision's {name} takes 3-channel images; this data is {input_shape}: "
                         "use --model cnn, or RGB data")


def _user_model(spec: str, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    fn = load_user_function(spec, "--model")
    offered = {"input_shape": input_shape, "num_outputs": num_outputs, "num_classes": num_outputs}
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    with user_code("--model", spec, "building the model"):
        model = fn(**{k: v for k, v in offered.items() if takes_all or k in params})
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec} must return a torch.nn.Module, got {type(model).__name__}")
    return model
