"""The output contract of every `aigw` command: one JSON value on stdout, or one error line on
stderr (`aigw: error: <reason>`, credentials redacted) and a non-zero exit status."""

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

PROG = "aigw"
EXIT_OK = 0
EXIT_ERROR = 1  # the command ran and failed
EXIT_USAGE = 2  # the command line itself was wrong: nothing ran
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a process ended by SIGINT

# What a credential looks like: gateway keys, the providers' key shapes, and any long random
# token (40 characters or more, four digits among them: a key of a shape not listed here). An
# error never prints one, whatever raised it.
_CREDENTIAL = re.compile(
    r"gw_(?:live|test)_\w+|\b(?:sk|rk|pk)[-_][\w-]{6,}|\bAIza[\w-]{10,}|\bxai-[\w-]{6,}"
    r"|\bgsk_\w{6,}|\b(?=(?:[A-Za-z_-]*[0-9]){4})[\w-]{40,}")


def redact(text: str) -> str:
    """`text` with anything shaped like a credential replaced by `<redacted>`."""
    return _CREDENTIAL.sub("<redacted>", text)


def one_line(text: object) -> str:
    """`text` with every run of whitespace, newlines included, made one space."""
    return " ".join(str(text).split())


def emit(value: Any) -> int:
    """Print `value` as JSON on stdout; the exit status (1 if stdout was closed early)."""
    try:
        print(json.dumps(value, indent=2), flush=True)
    except BrokenPipeError:
        # Python's own flush at exit would fail again and print a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    return EXIT_OK


def fail(message: object, code: int = EXIT_ERROR) -> int:
    """Print `message` as the one error line on stderr; returns `code`."""
    print(f"{PROG}: error: {redact(one_line(message))}", file=sys.stderr, flush=True)
    return code


def say_created(path: Path) -> None:
    """Tell stderr that this command created the store at `path`."""
    print(f"{PROG}: created a new store at {path}", file=sys.stderr, flush=True)
