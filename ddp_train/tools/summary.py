"""`ddp-train summary`: a layer table and memory estimate of a model, from one dummy forward pass."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

MB = 1024 ** 2


def summary(
    model: Annotated[Optional[str], typer.Option("--model", help="mlp, cnn, linear, a torchvision model name, "
                                                 "or package.module:function.", show_default=False)] = None,
    input_shape: Annotated[Optional[str], typer.Option("--input-shape", help="One sample's shape: C,H,W (or F).",
                                                       show_default=False)] = None,
    classes: Annotated[int, typer.Option("--classes", min=1, help="Outputs of the model (classes, or "
                                         "regression targets).")] = 10,
    hidden: Annotated[str, typer.Option("--hidden", help="Hidden widths of --model mlp.")] = "128,64",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch of the dummy pass "
                                            "(scales the activation estimate).")] = 1,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", "-c", help="Instead of --model: the "
                          "model (built-in or your Task's) of a run's checkpoint, on one real validation "
                          "batch.", show_default=False)] = None,
    trust_code: Annotated[Optional[list[str]], typer.Option("--trust-code", help="With --checkpoint: code the "
                          "checkpoint names (its --task, or a --data/--model module:function) that you have read "
                          "and allow to run; repeat for several (docs/security.md).", show_default=False)] = None,
) -> None:
    """Layers, output shapes, parameter counts and memory of a model (like torchkeras' summary).

    Runs one forward pass on a dummy batch (in eval mode, on the CPU) with a hook on every
    layer; with --checkpoint, the run's own model (a Task's too) on a real validation batch.
    Memory estimates assume the parameters' dtype; forward/backward counts each layer's output
    twice (the activation and its gradient).

    Examples:

      ddp-train summary --model cnn --input-shape 1,28,28 --classes 10

      ddp-train summary --model resnet18 --input-shape 3,224,224 --classes 1000

      ddp-train summary --checkpoint runs/char-lm/checkpoints/last.pt --batch-size 8
    """
    import torch

    from ..config import parse_shape
    from ..errors import UsageError
    from ..models import build_model

    if checkpoint:
        net, forward, input_numel = _from_checkpoint(checkpoint, batch_size, trust_code or [])
    elif model and input_shape:
        shape = parse_shape(input_shape, "--input-shape")
        net = build_model(model, shape, classes, parse_shape(hidden, "--hidden"))
        dummy = torch.randn(batch_size, *shape)
        forward, input_numel = (lambda m: m(dummy)), dummy.numel()
    else:
        raise UsageError("summary needs --model and --input-shape, or --checkpoint of a run")
    try:
        rows = layer_rows(net, forward)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        if checkpoint:
            raise UsageError(f"{checkpoint}: the model failed on a validation batch ({first})") from None
        raise UsageError(f"--model {model} does not take input of shape {shape} ({first}); pass the shape of "
                         "one sample the model was built for with --input-shape") from None
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    typer.echo(render(rows, total, trainable, input_numel, _bytes_per(net)))


def _from_checkpoint(path: str, batch_size: int, trust_code: list[str]) -> tuple[Any, Any, int]:
    """The run's model with its weights, and a forward over `batch_size` validation samples run
    through the task's own eval_step (so a Task's batches of any structure work)."""
    from torch.utils.data import default_collate

    from ..batch import count
    from ..dist import Comm
    from ..distenv import DistEnv
    from ._loading import load

    loaded = load(path, "val", Comm(DistEnv.from_environ({})), data=None, data_dir=None, model=None, config=None,
                  trust_code=trust_code)
    ds = loaded.dataset
    n = min(batch_size, len(ds))
    batch = ds[slice(0, n)] if hasattr(ds, "x") else default_collate([ds[i] for i in range(n)])
    numel = sum(t.numel() for t in _tensors(batch)) if count(batch) else 0
    return loaded.model, lambda m: loaded.task.eval_step(m, batch), numel


def _tensors(batch: Any) -> list:
    import torch

    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


def layer_rows(net: Any, forward: Any) -> list[tuple[str, str, list[int] | None, int, int]]:
    """(name, type, output shape, new parameters, output elements) per call of each leaf layer and
    of each layer with parameters of its own (attention's in_proj). A parameter counts once, on
    its first row (a shared ReLU, tied weights); a layer the forward did not call (fused away, as
    a transformer layer's fast path in eval mode does) gets a row with no shape. The rows add up
    to every parameter of the model."""
    import torch

    rows: list = []
    counted: set[int] = set()

    def new_params(module: Any) -> int:
        fresh = [p for p in module.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)

    def hook(name: str):
        def record(module: Any, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            out_shape = list(out.shape) if isinstance(out, torch.Tensor) else []
            rows.append((name, type(module).__name__, out_shape, new_params(module), _numel(out_shape)))
        return record

    shown = [(n, m) for n, m in net.named_modules()
             if n and (not any(True for _ in m.children()) or any(True for _ in m.parameters(recurse=False)))]
    handles = [m.register_forward_hook(hook(n)) for n, m in shown]
    try:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            forward(net)
        net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    for name, module in [("", net)] + shown:
        params = new_params(module)
        if params:
            rows.append((name or "(model)", type(module).__name__, None, params, 0))
    return rows


def render(rows: list, total: int, trainable: int, input_numel: int, bytes_per: int) -> str:
    names = [f"{n} ({t})" for n, t, *_ in rows]
    w = max([len("Layer (type)")] + [len(n) for n in names]) + 2
    ruler = "=" * (w + 40)
    lines = [ruler, f"{'Layer (type)':<{w}}{'Output Shape':<26}{'Param #':>14}", ruler]
    lines += [f"{name:<{w}}{'(not called)' if shape is None else str(shape):<26}{params:>14,}"
              for name, (_, _, shape, params, _) in zip(names, rows)]
    activations = sum(r[4] for r in rows)
    sizes = [("Input size (MB)", input_numel * bytes_per / MB),
             ("Forward/backward pass size (MB)", 2 * activations * bytes_per / MB),
             ("Params size (MB)", total * bytes_per / MB)]
    lines += [ruler, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
              f"Non-trainable params: {total - trainable:,}", "-" * (w + 40)]
    lines += [f"{label}: {value:.6f}" for label, value in sizes]
    lines += [f"Estimated Total Size (MB): {sum(v for _, v in sizes):.6f}", "-" * (w + 40)]
    return "\n".join(lines)


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _bytes_per(net: Any) -> int:
    first = next(iter(net.parameters()), None)
    return first.element_size() if first is not None else 4
