"""Folders and files appear whole or not at all, and a folder being replaced is never missing."""

from __future__ import annotations

import pytest

from qlora_app.machine.atomic import _exchange, clean_stale, staged_dir, write_text_atomic


def test_a_replaced_folder_is_swapped_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "which").write_text("a")
    (b / "which").write_text("b")
    assert _exchange(a, b)  # renameat2(RENAME_EXCHANGE): this kernel swaps, no moment without b
    assert (b / "which").read_text() == "a" and (a / "which").read_text() == "b"


def test_staged_folder_replaces_the_old_one_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "adapter"
    with staged_dir(target) as staging:
        (staging / "weights").write_text("v1")
    with staged_dir(target) as staging:
        assert (target / "weights").read_text() == "v1"  # the old one stays in place while the new one fills
        (staging / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert oct(target.stat().st_mode & 0o777) == "0o755"


def test_a_failure_while_staging_keeps_the_old_folder(tmp_path):
    target = tmp_path / "merged"
    with staged_dir(target) as staging:
        (staging / "model").write_text("good")
    with pytest.raises(RuntimeError), staged_dir(target) as staging:
        (staging / "model").write_text("half")
        raise RuntimeError("killed midway")
    assert (target / "model").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_leftovers_of_a_killed_process_are_cleaned_but_never_the_real_folder(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / ".merged-abc123").mkdir()
    (tmp_path / ".merged-abc123-old").mkdir()
    clean_stale(tmp_path, "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_file_written_atomically_is_whole_or_absent(tmp_path):
    path = tmp_path / "manifest.json"
    write_text_atomic(path, "{}\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # fails mid-write
    assert path.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
