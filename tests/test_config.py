import pytest

from ddp_train.config import FitConfig, build_config, config_from_dict
from ddp_train.errors import UsageError


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"lr": -0.1}, "--lr must be > 0"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"optimizer": "lion"}, "--optimizer must be one of sgd, adam, adamw"),
    ({"precision": "8"}, "--precision must be one of"),
    ({"input_shape": "1,x"}, "--input-shape must be comma-separated"),
    ({"save_every": 0}, "--save-every must be >= 1"),
    ({"keep": 0}, "--keep must be >= 1"),
    ({"lr": float("inf")}, "--lr must be a finite number \\(got inf\\)"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"momentum": 5.0}, "--momentum must be <= 1 \\(got 5.0\\)"),
    ({"momentum": float("nan")}, "--momentum must be a finite number"),
    ({"label_smoothing": 2.0}, "--label-smoothing must be <= 1"),
    ({"weight_decay": float("inf")}, "--weight-decay must be a finite number"),
    ({"clip_grad_norm": float("inf")}, "--clip-grad-norm must be a finite number"),
])
def test_validation(changes, message):
    with pytest.raises(UsageError, match=message):
        FitConfig(**changes)


def test_toml_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 3\nlr = 1\nbatch-size = 8\ndata = "linreg"\n')
    cfg = build_config({"epochs": 5, "lr": None}, str(path))
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.data) == (5, 1.0, 8, "linreg")


def test_toml_fit_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[fit]\nseed = 7\n')
    assert build_config({}, str(path)).seed == 7


@pytest.mark.parametrize("text, message", [
    ("batchsize = 3", "unknown key 'batchsize' \\(did you mean 'batch_size'\\?\\)"),
    ('epochs = "ten"', "epochs must be int"),
    ("compile = 1", "compile must be bool"),
    ("epochs = [", "not valid TOML"),
])
def test_toml_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError, match=message):
        build_config({}, str(path))


def test_missing_toml(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        build_config({}, str(tmp_path / "nope.toml"))


def test_round_trip():
    cfg = FitConfig(data="linreg", epochs=2, max_steps=5)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_monitor_mode():
    assert FitConfig(monitor="val_acc").monitor_mode() == "max"
    assert FitConfig(monitor="val_loss").monitor_mode() == "min"
    assert FitConfig(monitor="val_acc", mode="min").monitor_mode() == "min"


def test_fitconfig_docstring_has_a_line_per_field_from_its_help():
    """FitConfig's Attributes section is generated from the fields: each field, its option and its
    --help text (the words, whatever the wrapping)."""
    import dataclasses
    import inspect

    doc = " ".join(inspect.getdoc(FitConfig).split())
    for f in dataclasses.fields(FitConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert f"{f.name} ({flag}, default {f.default!r}): {' '.join(f.metadata['help'].split())}" in doc
