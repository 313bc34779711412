"""The docs: the site builds with --strict (links, anchors, every page in the nav), every
`ddp-train` command shown in README.md and docs/ parses against the real command line, and every
file of this repository that they name exists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer

from ddp_train.cli import app, parse_task_args
from ddp_train.config import build_config
from docs_blocks import PAGES, ROOT, blocks, commands, ddp_train_args, repo_paths

SHOWN = [(f"{b.page.name}:{b.line}", cmd, args) for page in PAGES for b in blocks(page)
         for cmd in commands(b) if (args := ddp_train_args(cmd)) is not None]


def test_the_pages_show_commands():
    assert len(SHOWN) > 25, SHOWN  # the parser found the blocks: a silent zero would pass the next test


def parse(args: list[str]) -> None:
    """What `ddp-train ARGS` would do before it starts any work: click parses and converts the
    options, and fit's settings are validated as FitConfig (TOML files are not read)."""
    group = typer.main.get_command(app)
    try:
        if not args or args[0].startswith("-"):  # the root's own options: --help, --version
            group.make_context("ddp-train", list(args))
            return
        name, *rest = args
        with typer.Context(group, info_name="ddp-train") as ctx:
            command = group.get_command(ctx, name)
            if command is None:
                raise typer.BadParameter(f"no command {name!r}")
            with command.make_context(name, rest, parent=ctx) as sub:
                if name == "fit":
                    options = {k: v for k, v in sub.params.items() if k != "config"}
                    options["task_args"] = parse_task_args(options.get("task_args"))
                    build_config(options)
    except typer.Exit:  # --help, --version
        pass


@pytest.mark.parametrize("where, command, args", SHOWN, ids=[f"{w}:{' '.join(a)[:50]}" for w, _, a in SHOWN])
def test_every_command_shown_parses(where, command, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no run directory of this checkout is read
    parse(args)


def test_a_wrong_command_does_not_parse():
    parse(["fit", "--help"])
    parse(["--version"])
    for args in (["fit", "--batchsize", "3"], ["fit", "--lr", "-1"], ["fti"], ["evaluate", "--nope"]):
        with pytest.raises(Exception):
            parse(args)


def test_every_file_the_pages_name_exists():
    missing = sorted(f"{page.name}: {path}" for page in PAGES for path in repo_paths(page.read_text())
                     if not (ROOT / path).exists())
    assert not missing, missing


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("material", reason="the docs extra (mkdocs-material) is not installed")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "resume" / "index.html").is_file()
