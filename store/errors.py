"""The store's exceptions, shared by every part of it."""

from pathlib import Path


class StoreError(Exception):
    """The store refused an operation (bad input, missing record)."""


class StoreUnavailable(StoreError):
    """The store cannot be read or written: quota data is unavailable."""


class StoreMissing(StoreError):
    """No store at the path, and the caller asked not to create one."""


def missing_store_message(path: str | Path) -> str:
    """What to tell someone who pointed a tool at a path with no store."""
    return (f"no store at {path}: create one with `aigw org create ...` or `aigw import FILE`, "
            f"or run scripts/run for a demo store")
