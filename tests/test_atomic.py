"""Atomic writes: a target is replaced whole or left exactly as it was, and no temporary is left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hf_dataselect import atomic


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def failing_replace(monkeypatch, when):
    """Make ``os.replace`` raise for the calls where ``when(src, dst)`` is true."""
    real = os.replace

    def replace(src, dst):
        if when(Path(src), Path(dst)):
            raise OSError("simulated failure")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_write_text_creates_parents_and_writes_utf8(tmp_path):
    path = tmp_path / "a" / "b" / "note.md"
    assert atomic.write_text(path, "héllo ✓\n") == path
    assert path.read_bytes() == "héllo ✓\n".encode()
    assert entries(path.parent) == ["note.md"]


def test_write_text_replaces_an_existing_file(tmp_path):
    path = tmp_path / "note.md"
    path.write_text("old")
    atomic.write_text(path, "new")
    assert path.read_text() == "new"
    assert entries(tmp_path) == ["note.md"]


def test_an_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "note.md"
    path.write_text("old")
    failing_replace(monkeypatch, lambda src, dst: dst == path)
    with pytest.raises(OSError, match="simulated"):
        atomic.write_text(path, "new")
    assert path.read_text() == "old"
    assert entries(tmp_path) == ["note.md"]


def test_write_json_format(tmp_path):
    path = tmp_path / "data.json"
    atomic.write_json(path, {"b": [1, 2], "a": "é"})
    assert path.read_text(encoding="utf-8") == '{\n  "b": [\n    1,\n    2\n  ],\n  "a": "é"\n}\n'
    atomic.write_json(path, {"a": "é", "p": Path("x")}, indent=1, ensure_ascii=True, default=str)
    assert path.read_text() == '{\n "a": "\\u00e9",\n "p": "x"\n}\n'
    assert json.loads(path.read_text()) == {"a": "é", "p": "x"}


def test_json_that_cannot_be_serialised_leaves_the_old_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        atomic.write_json(path, {"new": object()})
    assert path.read_text() == '{"old": true}\n'
    assert entries(tmp_path) == ["data.json"]


def test_writing_a_file_by_name(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with atomic.writing(path) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".") and not temporary.exists()
        temporary.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic.writing(path) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"new"
    assert entries(tmp_path) == ["weights.bin"]


def make_folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_replace_folder_moves_into_a_new_target(tmp_path):
    staging = make_folder(tmp_path / ".staging", data="new")
    atomic.replace_folder(staging, tmp_path / "out")
    assert entries(tmp_path) == ["out"]
    assert (tmp_path / "out" / "data").read_text() == "new"


def test_replace_folder_replaces_an_existing_target(tmp_path):
    make_folder(tmp_path / "out", data="old", extra="old")
    staging = make_folder(tmp_path / ".staging", data="new")
    atomic.replace_folder(staging, tmp_path / "out")
    assert entries(tmp_path) == ["out"]
    assert entries(tmp_path / "out") == ["data"]
    assert (tmp_path / "out" / "data").read_text() == "new"


def test_replace_folder_restores_the_old_folder_when_the_move_fails(tmp_path, monkeypatch):
    target = make_folder(tmp_path / "out", data="old")
    staging = make_folder(tmp_path / ".staging", data="new")
    moved_aside = []

    def fails(src: Path, dst: Path) -> bool:
        if src == target:
            moved_aside.append(dst)
        return src == staging

    failing_replace(monkeypatch, fails)
    with pytest.raises(OSError, match="simulated"):
        atomic.replace_folder(staging, target)
    assert (target / "data").read_text() == "old"
    assert (staging / "data").read_text() == "new"  # the caller still owns its staging folder
    assert entries(tmp_path) == [".staging", "out"]
    # the old folder was set aside under a name that SAE folder listings skip
    assert len(moved_aside) == 1 and moved_aside[0].name.endswith(".old")


def test_staging_folder_becomes_the_target(tmp_path):
    make_folder(tmp_path / "out", data="old")
    with atomic.staging_folder(tmp_path / "out") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.") and entries(staging) == []
        (staging / "data").write_text("new")
    assert entries(tmp_path) == ["out"]
    assert (tmp_path / "out" / "data").read_text() == "new"


def test_a_failing_staging_folder_leaves_the_target_and_no_trace(tmp_path):
    make_folder(tmp_path / "out", data="old")
    with pytest.raises(RuntimeError), atomic.staging_folder(tmp_path / "out") as staging:
        (staging / "data").write_text("half")
        raise RuntimeError("writer failed")
    assert entries(tmp_path) == ["out"]
    assert (tmp_path / "out" / "data").read_text() == "old"


def test_a_fixed_staging_name_clears_a_leftover_first(tmp_path):
    make_folder(tmp_path / "layer.partial", stale="from a crashed run")
    with atomic.staging_folder(tmp_path / "nested" / "layer", name="layer.partial") as staging:
        assert staging == tmp_path / "nested" / "layer.partial" and entries(staging) == []
        (staging / "data").write_text("new")
    assert entries(tmp_path / "nested") == ["layer"]
    with atomic.staging_folder(tmp_path / "layer", name="layer.partial") as staging:
        assert entries(staging) == []


def test_replace_false_keeps_a_target_another_writer_finished(tmp_path):
    make_folder(tmp_path / "model", config="theirs")
    with pytest.raises(OSError), atomic.staging_folder(tmp_path / "model", replace=False) as staging:
        (staging / "config").write_text("ours")
    assert entries(tmp_path) == ["model"]
    assert (tmp_path / "model" / "config").read_text() == "theirs"
    with atomic.staging_folder(tmp_path / "fresh", replace=False) as staging:
        (staging / "config").write_text("ours")
    assert (tmp_path / "fresh" / "config").read_text() == "ours"
