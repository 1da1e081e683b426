import os

import pytest
import torch

from medssl3d.data import atomic_files
from medssl3d.data.atomic_files import (
    atomic_open,
    atomic_torch_save,
    atomic_write_json,
    remove_stale_temporaries,
)


def test_a_failed_replace_keeps_the_old_content_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    atomic_write_json(path, {"outputs": {}})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"outputs": {"x": "y"}})
    monkeypatch.undo()
    assert path.read_text() == '{\n  "outputs": {}\n}\n'
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_an_exception_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_torch_save({"step": 1}, path)
    with pytest.raises(RuntimeError, match="killed"), atomic_open(path) as f:
        f.write(b"half a checkpo")
        raise RuntimeError("killed")
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(path.parent) == ["ckpt.pt"]


@pytest.mark.parametrize("durable", [True, False])
def test_written_content_round_trips_and_follows_the_umask(tmp_path, durable):
    old = os.umask(0o027)
    try:
        path = atomic_torch_save({"w": torch.arange(3)}, tmp_path / "enc.pt", durable=durable)
    finally:
        os.umask(old)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    # the mode open() would give (a shared cache stays readable to the group), not mkstemp's private 0600
    assert path.stat().st_mode & 0o777 == 0o640


def test_text_mode_and_a_bad_mode(tmp_path):
    with atomic_open(tmp_path / "a.txt", "w") as f:
        f.write("ü\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "ü\n"
    with pytest.raises(ValueError, match="'ab'"), atomic_open(tmp_path / "a.txt", "ab"):
        pass


def test_stale_temporaries_of_one_file_are_removed_and_others_kept(tmp_path):
    path = tmp_path / "last.pt"
    # what a writer killed between open and replace leaves
    stale = atomic_files._temporary(path)
    stale.write_bytes(b"partial")
    other = atomic_files._temporary(tmp_path / "step_00000010.pt")
    other.write_bytes(b"partial")
    assert remove_stale_temporaries(path) == [stale]
    assert not stale.exists() and other.exists()
