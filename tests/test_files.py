"""files.py: atomic writes (no partial file, no stray temporary), strict JSON, safe loads."""
import json
import math
import os
import pickle

import pytest
import torch

from guidance_kernels import files


def _raise_constant(name):
    raise ValueError(f"non-strict JSON token {name}")


def test_write_json_is_strict(tmp_path):
    p = files.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")],
                                               "c": torch.tensor(0.5), "d": (2, -math.inf)})
    d = json.loads(p.read_text(), parse_constant=_raise_constant)
    assert d == {"a": None, "b": [1.0, None], "c": 0.5, "d": [2, None]}


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "x.txt"
    files.write_text(p, "old")

    class Boom(RuntimeError):
        pass

    with pytest.raises(files.FileWriteError, match="x.txt"):
        with files.atomic_write(p) as tmp:
            tmp.write_text("partial")
            raise Boom("disk full")
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["x.txt"]


def test_write_to_a_folder_is_a_clear_error(tmp_path):
    with pytest.raises(files.FileWriteError, match="is a folder"):
        files.write_text(tmp_path, "x")


def test_save_and_load_torch_roundtrip(tmp_path):
    state = {"w": torch.randn(3, 2), "step": 7}
    p = files.save_torch(state, tmp_path / "ck.pt")
    back = files.load_torch(p)
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_load_refuses_code(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(files.FileLoadError, match="evil.pt"):
        files.load_torch(p)


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"PK\x03\x04truncated"])
def test_corrupt_or_empty_checkpoint_names_the_file(tmp_path, content):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(files.FileLoadError, match="bad.pt"):
        files.load_torch(p)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(files.FileLoadError, match="nope.pt: no such file"):
        files.load_torch(tmp_path / "nope.pt")


def test_save_figure_atomic(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    p = files.save_figure(fig, tmp_path / "f.png", dpi=50)
    plt.close(fig)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["f.png"]
