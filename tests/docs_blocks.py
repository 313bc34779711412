"""The code blocks of README.md and docs/*.md, and the commands in them (for tests/test_docs.py and
tests/test_readme.py)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell", "console")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str


def blocks(page: Path) -> list[Block]:
    out, lines = [], page.read_text().splitlines()
    start = lang = None
    for i, line in enumerate(lines):
        fence = re.match(r"\s*```(\w*)", line)
        if fence and start is None:
            start, lang = i, fence.group(1)
        elif fence and start is not None:
            out.append(Block(page, start + 1, lang, "\n".join(lines[start + 1:i])))
            start = None
    return out


def commands(block: Block) -> list[str]:
    """Shell blocks: every line that is not a comment (continuations joined); other blocks: the
    lines shown after a `$ ` prompt."""
    if block.lang not in SHELLS:
        return [ln[2:] for ln in block.text.splitlines() if ln.startswith("$ ")]
    joined = re.sub(r"\\\n\s*", " ", block.text)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def words(command: str) -> list[str]:
    return [w for w in shlex.split(command, comments=True) if w not in ("...", "&")]


def ddp_train_args(command: str) -> list[str] | None:
    """The arguments `ddp-train` gets from a shown command, or None when it runs no ddp-train."""
    tokens = words(command)
    env = {t.split("=", 1)[0] for t in tokens if re.match(r"^[A-Z_]+=", t)}
    for i, tok in enumerate(tokens):
        if tok.rsplit("/", 1)[-1] == "ddp-train":
            return tokens[i + 1:]
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "ddp_train":
            return tokens[i + 2:]
        if tok.rsplit("/", 1)[-1] in ("local.sh", "multinode.sh"):
            return ["fit", *tokens[i + 1:]]
        if tok.startswith("slurm/") and tok.endswith(".sbatch") and "SCRIPT" not in env:
            return ["fit", *tokens[i + 1:]]  # arguments after the script go to `ddp-train fit`
    return None


REPO_PATH = re.compile(r"(?<![\w/.$-])((?:examples|launch|slurm|benchmarks|tests|ddp_train|docs|ci|\.ci)/[\w./-]*\w)")


def repo_paths(text: str) -> set[str]:
    """Paths inside this repository that a page names (`examples/char_lm.py:CharLM` -> the file)."""
    return {m.group(1) for m in REPO_PATH.finditer(text)}
