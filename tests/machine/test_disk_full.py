"""A full disk is recognised whichever writer hits it: Python's, safetensors' or torch.save's, on a real tmpfs."""

from __future__ import annotations

import pytest
import torch

from qlora_app.machine.disk_full import is_disk_full

TENSORS = {"weight": torch.zeros(1 << 21)}  # 8 MiB, on a 4 MiB disk: more than the 1 MiB "almost full" margin


@pytest.fixture
def tiny_disk(tmp_path):
    from conftest import SmallDisk

    disk = SmallDisk(tmp_path / "tiny-disk", 4 << 20)
    yield disk.outside
    disk.close()


def python_write(path):
    path.write_bytes(bytes(8 << 20))


def safetensors_save(path):
    from safetensors.torch import save_file

    save_file(TENSORS, path)


def torch_save(path):
    torch.save(TENSORS, path)


@pytest.mark.parametrize("write", [python_write, safetensors_save, torch_save])
def test_each_writer_running_out_of_space_is_a_full_disk(tiny_disk, write):
    with pytest.raises(Exception) as failure:
        write(tiny_disk / "out")
    assert is_disk_full(failure.value, tiny_disk), repr(failure.value)


def test_a_torch_writer_error_with_room_left_is_not_a_full_disk(tmp_path):
    error = RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert not is_disk_full(error, tmp_path)  # the test's temporary folder has more than 1 MiB free


def test_other_errors_are_not_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError) as failure:
        torch.save(TENSORS, tmp_path / "no-such-folder" / "out.pt")
    assert not is_disk_full(failure.value, tmp_path)
    assert not is_disk_full(ValueError("loss is nan"), tmp_path)


def test_a_full_disk_behind_another_error_is_found():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            raise RuntimeError("checkpoint failed") from exc
    except RuntimeError as exc:
        assert is_disk_full(exc, "/")
