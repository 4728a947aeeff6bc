"""Text corpora that ship with Python, tokenised per character for the masked-diffusion models.

Two corpora, both built from the running interpreter's own files, so nothing is downloaded:

- `code`: single-line Python statements from a fixed list of standard-library modules
  (`CODE_MODULES`). Every statement is cut from its source line by the positions `ast` gives, and
  kept when it is printable ASCII, fits in the sequence length, and parses on its own with
  `ast.parse`. A statement such as `return x` parses (the parser accepts it; only the compiler
  rejects it outside a function).
- `english`: the bundled documentation text in `pydoc_data.topics` (what `help()` prints). Each
  paragraph is word-wrapped to the sequence length, and lines of printable ASCII with at least 20
  characters are kept.

Duplicates are dropped. Each text goes to train (90%), valid (5%) or test (5%) by a SHA-1 hash of
its text, so the split does not depend on file order. The texts depend on the interpreter's
version; `Corpus.python_version` records it, and a checkpoint stores it.

Tokens: 0 is padding, 1 is the mask token, and the 95 printable ASCII characters (32 to 126)
follow. A sequence is the text's characters padded to the sequence length; padding is part of what
a model learns to generate, so a sample's text ends at its first padding token.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

PAD, MASK = 0, 1
FIRST_CHAR, LAST_CHAR = 32, 126
VOCAB_SIZE = 2 + LAST_CHAR - FIRST_CHAR + 1
DEFAULT_LENGTH = 64
CORPORA = ("code", "english")
SPLITS = ("train", "valid", "test")

# Standard-library modules (pure Python in CPython 3.11) whose statements form the code corpus.
CODE_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections/__init__", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html/parser",
    "http/client", "inspect", "ipaddress", "json/decoder", "json/encoder", "logging/__init__", "mailbox", "netrc",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "sched", "shlex",
    "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "typing", "urllib/parse", "uuid", "warnings", "weakref",
    "zipfile",
)


@dataclass(frozen=True)
class Corpus:
    """The texts of one corpus, split, with the sequence length they were filtered for."""

    name: str
    length: int
    train: tuple[str, ...]
    valid: tuple[str, ...]
    test: tuple[str, ...]
    python_version: str

    def split(self, name: str) -> tuple[str, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return getattr(self, name)


def encode(texts: list[str] | tuple[str, ...], length: int) -> torch.Tensor:
    """Token ids (N, length), padded with PAD; raises ValueError for a text that does not fit."""
    out = torch.full((len(texts), length), PAD, dtype=torch.long)
    for row, text in enumerate(texts):
        if len(text) > length:
            raise ValueError(f"text of {len(text)} characters does not fit in length {length}: {text[:40]!r}...")
        codes = [ord(c) for c in text]
        if any(c < FIRST_CHAR or c > LAST_CHAR for c in codes):
            raise ValueError(f"text contains characters outside printable ASCII: {text[:40]!r}")
        out[row, : len(codes)] = torch.tensor(codes) - FIRST_CHAR + 2
    return out


def decode(tokens: torch.Tensor) -> list[str]:
    """Texts of token rows (N, length): characters up to the first padding token; a mask token left
    in a sample decodes as '_'."""
    texts = []
    for row in tokens.tolist():
        chars = []
        for token in row:
            if token == PAD:
                break
            chars.append("_" if token == MASK else chr(token - 2 + FIRST_CHAR))
        texts.append("".join(chars))
    return texts


def is_valid_statement(text: str) -> bool:
    """True when `text` is non-empty and `ast.parse` accepts it."""
    if not text.strip():
        return False
    try:
        with warnings.catch_warnings():
            # The parser warns about odd literals in generated samples ("1if"); they are not errors.
            warnings.simplefilter("ignore", SyntaxWarning)
            ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def load_corpus(name: str = "code", length: int = DEFAULT_LENGTH) -> Corpus:
    """Build a corpus from the running interpreter's files (a few seconds)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; allowed: {', '.join(CORPORA)}")
    if length < 8:
        raise ValueError(f"sequence length must be >= 8, got {length}")
    texts = _code_statements(length) if name == "code" else _english_lines(length)
    parts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for text in sorted(set(texts)):
        bucket = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) % 100
        if bucket < 90:
            parts["train"].append(text)
        elif bucket < 95:
            parts["valid"].append(text)
        else:
            parts["test"].append(text)
    version = ".".join(str(v) for v in sys.version_info[:3])
    return Corpus(name, length, tuple(parts["train"]), tuple(parts["valid"]), tuple(parts["test"]), version)


def _printable(text: str) -> bool:
    return all(FIRST_CHAR <= ord(c) <= LAST_CHAR for c in text)


def _code_statements(length: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [m for m in CODE_MODULES if not (root / f"{m}.py").is_file()]
    if missing:
        raise FileNotFoundError(
            f"standard-library source files not found under {root}: {', '.join(m + '.py' for m in missing[:5])}; "
            "the code corpus needs a Python installation with its library sources (not a bytecode-only build)"
        )
    statements = []
    for module in CODE_MODULES:
        source = (root / f"{module}.py").read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.stmt) or node.lineno != node.end_lineno:
                continue
            text = lines[node.lineno - 1][node.col_offset : node.end_col_offset]
            if 3 <= len(text) <= length and _printable(text) and is_valid_statement(text):
                statements.append(text)
    return statements


def _english_lines(length: int) -> list[str]:
    from pydoc_data.topics import topics

    lines = []
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            flat = re.sub(r"\s+", " ", paragraph).strip()
            for line in textwrap.wrap(flat, width=length):
                if len(line) >= 20 and _printable(line):
                    lines.append(line)
    return lines
