"""Atomic writes: a file or folder is replaced whole, or left as it was.

Everything the library writes for later (selections, recipe runs, SAEs, checkpoints, caches) is first written
under a temporary name in the same folder, then renamed over the target with :func:`os.replace`, which is atomic
within one file system. An interrupted or failing write therefore never leaves a half-written file where a
complete one was, and a reader never sees one. Temporary names start with a dot, so listings ignore them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """A not-yet-existing temporary path next to ``path``; it replaces ``path`` when the block succeeds.

    For writers that want a file name (``safetensors.save_file``, ``open``): on an error the temporary file is
    removed and ``path`` keeps its old content. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    with writing(path) as temporary, open(temporary, "x", encoding="utf-8") as stream:
        stream.write(text)
    return path


def write_json(
    path: str | os.PathLike,
    data: Any,
    *,
    indent: int | None = 2,
    ensure_ascii: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``data`` as JSON and a final newline to ``path`` atomically; returns the path.

    The text is serialised before anything is written, so a value JSON cannot hold raises and touches no file.
    """
    text = json.dumps(data, indent=indent, ensure_ascii=ensure_ascii, default=default) + "\n"
    return write_text(path, text)


def replace_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``staging`` to ``target`` (both in the same file system).

    An existing ``target`` is first renamed aside and deleted only once ``staging`` is in its place; if that
    move fails it is put back, so ``target`` is always either the old folder or the new one. The aside name ends
    in ``.old`` (:func:`hf_dataselect.sae.io.list_hookpoints` skips such folders).
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    aside = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(aside, ignore_errors=True)  # left by a crashed earlier attempt of this process id
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staging_folder(
    target: str | os.PathLike, *, name: str | None = None, replace: bool = True
) -> Iterator[Path]:
    """An empty folder next to ``target`` to write into; it becomes ``target`` when the block succeeds.

    ``name``: a fixed name for the staging folder (a leftover of an interrupted earlier attempt is removed
    first); by default a fresh :func:`tempfile.mkdtemp` folder ``.<target name>.XXXX``. ``replace=False`` keeps
    an existing non-empty ``target`` (the final rename raises :class:`OSError`), for caches where the first of
    several concurrent writers wins. On any error the staging folder is removed and ``target`` is unchanged.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    else:
        staging = target.with_name(name)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    try:
        yield staging
        if replace:
            replace_folder(staging, target)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
