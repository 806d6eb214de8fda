"""Issue 12, class 8: the dataset cache is checked. A cache file rewritten with valid
safetensors, the original metadata and altered pixels (or labels) is rebuilt from the source,
never used."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from bd4nn.data import load_dataset
from test_data import _assert_tiny, _tree_files, _write_folder


def _forge(cache_file: Path, edit) -> None:
    with safe_open(str(cache_file), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(cache_file), metadata=meta)  # same key, same stored hash, other content


def test_a_tampered_cache_is_rebuilt_not_used(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "tiny", _tree_files())
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
    assert load_dataset("imagefolder", root, cache_dir=cache, progress=False).from_cache

    def pixels(t):
        t["train_x"][0, 0, 0, 0] ^= 0xFF

    def labels(t):
        t["test_y"][0] = (t["test_y"][0] + 1) % 3

    for edit in (pixels, labels):
        _forge(Path(first.cache_file), edit)
        again = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
        assert not again.from_cache  # the forgery was detected and the source decoded again
        _assert_tiny(again)
        assert load_dataset("imagefolder", root, cache_dir=cache, progress=False).from_cache  # rewritten
