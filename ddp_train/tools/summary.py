"""`ddp-train summary`: a layer table and memory estimate of a model, from one dummy forward pass."""

from __future__ import annotations

from typing import Annotated, Any

import typer

MB = 1024 ** 2


def summary(
    model: Annotated[str, typer.Option("--model", help="mlp, cnn, linear, a torchvision model name, "
                                       "or package.module:function.", show_default=False)],
    input_shape: Annotated[str, typer.Option("--input-shape", help="One sample's shape: C,H,W (or F).",
                                             show_default=False)],
    classes: Annotated[int, typer.Option("--classes", min=1, help="Outputs of the model (classes, or "
                                         "regression targets).")] = 10,
    hidden: Annotated[str, typer.Option("--hidden", help="Hidden widths of --model mlp.")] = "128,64",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch of the dummy pass "
                                            "(scales the activation estimate).")] = 1,
) -> None:
    """Layers, output shapes, parameter counts and memory of a model (like torchkeras' summary).

    Runs one forward pass on a dummy batch (in eval mode, on the CPU) with a hook on every
    layer. Memory estimates assume the parameters' dtype; forward/backward counts each layer's
    output twice (the activation and its gradient).

    Examples:

      ddp-train summary --model cnn --input-shape 1,28,28 --classes 10

      ddp-train summary --model resnet18 --input-shape 3,224,224 --classes 1000

      ddp-train summary --model mlp --input-shape 64 --hidden 256,128
    """
    import torch

    from ..config import parse_shape
    from ..errors import UsageError
    from ..models import build_model

    shape = parse_shape(input_shape, "--input-shape")
    net = build_model(model, shape, classes, parse_shape(hidden, "--hidden"))
    try:
        rows = layer_rows(net, torch.randn(batch_size, *shape))
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise UsageError(f"--model {model} does not take input of shape {shape} ({first}); pass the shape "
                         "of one sample the model was built for with --input-shape") from None
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    typer.echo(render(rows, total, trainable, batch_size * _numel(shape), _bytes_per(net)))


def layer_rows(net: Any, batch: Any) -> list[tuple[str, str, list[int], int, int]]:
    """(name, type, output shape, new parameters, output elements) per call of each leaf layer.
    A layer called twice (a shared ReLU) shows its parameters on its first call only."""
    import torch

    rows: list = []
    seen: set[int] = set()

    def hook(name: str):
        def record(module: Any, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            out_shape = list(out.shape) if isinstance(out, torch.Tensor) else []
            params = 0 if id(module) in seen else sum(p.numel() for p in module.parameters(recurse=False))
            seen.add(id(module))
            rows.append((name, type(module).__name__, out_shape, params, _numel(out_shape)))
        return record

    leaves = [(n, m) for n, m in net.named_modules() if n and not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        was_training = net.training
        net.eval()
        with torch.no_grad():
            net(batch)
        net.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return rows


def render(rows: list, total: int, trainable: int, input_numel: int, bytes_per: int) -> str:
    names = [f"{n} ({t})" for n, t, *_ in rows]
    w = max([len("Layer (type)")] + [len(n) for n in names]) + 2
    ruler = "=" * (w + 40)
    lines = [ruler, f"{'Layer (type)':<{w}}{'Output Shape':<26}{'Param #':>14}", ruler]
    lines += [f"{name:<{w}}{str(shape):<26}{params:>14,}" for name, (_, _, shape, params, _) in zip(names, rows)]
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
