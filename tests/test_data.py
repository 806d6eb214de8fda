"""Tests of bd4nn.data: the offline archives, the cache, the clean split, ImageFolder trees and
the error messages. Expected values come from the archives' README (counts, class names) or from
decoding files independently with PIL, never from the module's own output."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bd4nn import data as D
from bd4nn.data import DatasetError, clean_split, defender_data, load_dataset

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
# images per class, class order 0..42 (shared/data/README.md, the official GTSRB figures)
GTSRB_TRAIN = [
    210, 2220, 2250, 1410, 1980, 1860, 420, 1440, 1410, 1470, 2010, 1320, 2100, 2160, 780, 630,
    420, 1110, 1200, 210, 360, 330, 390, 510, 270, 1500, 600, 240, 540, 270, 450, 780, 240, 689,
    420, 1200, 390, 210, 2070, 300, 360, 240, 240,
]
GTSRB_TEST = [
    60, 720, 750, 450, 660, 630, 150, 450, 450, 480, 660, 420, 690, 720, 270, 210, 150, 360, 390,
    60, 90, 90, 120, 150, 90, 480, 180, 60, 150, 90, 150, 270, 60, 210, 120, 390, 120, 60, 690,
    90, 90, 60, 90,
]


# --------------------------------------------------------------------------- shared archives


def _data_dir() -> Path:
    env = os.environ.get("BD4NN_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _archive(name: str) -> Path:
    path = _data_dir() / f"{name}.tar.xz"
    if not path.is_file():
        pytest.skip(f"{path} not found: set BD4NN_DATA to a folder holding {name}.tar.xz")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bd4nn-cache")


@pytest.fixture(scope="module")
def cifar10(cache_dir: Path) -> D.ImageData:
    path = _archive("cifar10")
    t0 = time.perf_counter()
    data = load_dataset("cifar10", path.parent, cache_dir=cache_dir, progress=False)
    print(f"cifar10 cold load: {time.perf_counter() - t0:.2f} s")
    return data


def _pil_member(archive: Path, member: str) -> torch.Tensor:
    with tarfile.open(archive, "r:xz") as tf:
        raw = tf.extractfile(member).read()
    arr = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


@pytest.mark.data
@pytest.mark.slow
def test_cifar10_counts_shapes_classes(cifar10: D.ImageData) -> None:
    assert cifar10.train_x.shape == (50_000, 3, 32, 32)
    assert cifar10.test_x.shape == (10_000, 3, 32, 32)
    assert cifar10.train_x.dtype == cifar10.test_x.dtype == torch.uint8
    assert cifar10.train_y.dtype == cifar10.test_y.dtype == torch.int64
    assert cifar10.classes == CIFAR10_CLASSES
    assert cifar10.num_classes == 10
    assert torch.bincount(cifar10.train_y, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(cifar10.test_y, minlength=10).tolist() == [1000] * 10
    # files are ordered by (split, class, name): labels come in sorted runs
    assert torch.equal(cifar10.train_y, torch.arange(10).repeat_interleave(5000))
    assert cifar10.spec.mean == (0.4914, 0.4822, 0.4465)
    assert cifar10.source == f"archive {_archive('cifar10')}"
    # real photos, not a constant or all-zero buffer
    assert 100 < cifar10.train_x[:1000].float().mean() < 150
    assert cifar10.train_x[:1000].float().std() > 40


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize(
    "member, split, index",
    [
        ("train/airplane/0000.jpg", "train", 0),
        ("train/cat/0017.jpg", "train", 3 * 5000 + 17),
        ("test/truck/0999.jpg", "test", 9999),
    ],
)
def test_cifar10_pixels_equal_pil_decode(
    cifar10: D.ImageData, member: str, split: str, index: int
) -> None:
    expected = _pil_member(_archive("cifar10"), member)
    x = cifar10.train_x if split == "train" else cifar10.test_x
    assert torch.equal(x[index], expected)


@pytest.mark.data
@pytest.mark.slow
def test_cifar10_second_load_hits_cache(cifar10: D.ImageData, cache_dir: Path) -> None:
    assert cifar10.from_cache is False
    assert cifar10.cache_file is not None and Path(cifar10.cache_file).is_file()
    assert Path(cifar10.cache_file).parent == cache_dir / "datasets"
    t0 = time.perf_counter()
    again = load_dataset("cifar10", _archive("cifar10").parent, cache_dir=cache_dir, progress=False)
    elapsed = time.perf_counter() - t0
    print(f"cifar10 warm load: {elapsed:.3f} s")
    assert elapsed < 2.0
    assert again.from_cache is True
    assert again.classes == CIFAR10_CLASSES
    assert again.source == cifar10.source
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(again, k), getattr(cifar10, k)), k


@pytest.mark.data
@pytest.mark.slow
def test_cifar10_via_env_var(cifar10: D.ImageData, cache_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("BD4NN_DATA", str(_archive("cifar10").parent))
    again = load_dataset("cifar10", cache_dir=cache_dir, progress=False)
    assert again.from_cache and again.source == cifar10.source


@pytest.mark.data
@pytest.mark.slow
def test_defender_data_is_the_clean_split(cifar10: D.ImageData) -> None:
    x, y = defender_data(cifar10, seed=3)
    idx = clean_split(50_000, 0.05, seed=3)
    assert x.shape == (2500, 3, 32, 32) and y.shape == (2500,)
    assert torch.equal(x, cifar10.train_x[idx]) and torch.equal(y, cifar10.train_y[idx])
    # a random 5% covers every class, each roughly 250 times
    counts = torch.bincount(y, minlength=10)
    assert counts.min() > 180 and counts.max() < 320


@pytest.mark.data
@pytest.mark.slow
def test_gtsrb_full_archive(cache_dir: Path) -> None:
    path = _archive("gtsrb")
    t0 = time.perf_counter()
    data = load_dataset("gtsrb", path, cache_dir=cache_dir, progress=False)
    print(f"gtsrb cold load: {time.perf_counter() - t0:.2f} s")
    assert data.classes == [f"{i:05d}" for i in range(43)]
    assert data.train_x.shape == (39_209, 3, 32, 32) and data.test_x.shape == (12_630, 3, 32, 32)
    assert torch.bincount(data.train_y, minlength=43).tolist() == GTSRB_TRAIN
    assert torch.bincount(data.test_y, minlength=43).tolist() == GTSRB_TEST
    assert torch.equal(data.train_x[0], _pil_member(path, "train/00000/00000_00000.jpg"))


# --------------------------------------------------------------------------- registry, split


def test_registry() -> None:
    assert {"cifar10", "cifar100", "gtsrb"} <= set(D.list_datasets())
    assert D.get_spec("cifar10").num_classes == 10
    assert D.get_spec("cifar100").num_classes == 100
    assert D.get_spec("gtsrb").num_classes == 43
    assert D.get_spec("gtsrb").std == (0.2724, 0.2608, 0.2669)
    with pytest.raises(DatasetError, match="cifar10, cifar100, gtsrb"):
        D.get_spec("mnist")


def test_clean_split() -> None:
    a = clean_split(50_000)
    assert a.dtype == torch.int64 and a.shape == (2500,)
    assert len(torch.unique(a)) == 2500
    assert int(a.min()) >= 0 and int(a.max()) < 50_000
    assert torch.equal(a, torch.sort(a).values)
    assert torch.equal(a, clean_split(50_000, 0.05, seed=0))
    b = clean_split(50_000, 0.05, seed=1)
    assert not torch.equal(a, b)
    assert len(np.intersect1d(a.numpy(), b.numpy())) < 500  # about 125 expected by chance
    assert clean_split(39_209, 0.05).shape == (1960,)  # round(1960.45)
    assert clean_split(10, 1.0).tolist() == list(range(10))
    with pytest.raises(ValueError):
        clean_split(100, 0.0)


# --------------------------------------------------------------------------- ImageFolder trees

# class folder -> solid colours of its 4 train images; the names sort as apple < mango < zebra
COLOURS = {
    "zebra": [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)],
    "apple": [(200, 100, 50), (1, 2, 3), (250, 250, 5), (77, 77, 77)],
    "mango": [(0, 0, 0), (255, 255, 255), (128, 64, 32), (9, 99, 199)],
}
SIZES = [(32, 32), (40, 24), (16, 16), (32, 32)]  # some need the resize to 32x32


def _png(colour: tuple[int, int, int], size: tuple[int, int], mode: str = "RGB") -> bytes:
    im = Image.new("RGB", size, colour)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _tree_files() -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for cls, colours in COLOURS.items():
        for i, (c, s) in enumerate(zip(colours, SIZES)):
            mode = "RGBA" if i == 1 else "RGB"  # an RGBA PNG must come out as plain RGB
            files[f"train/{cls}/img{i}.png"] = _png(c, s, mode)
        files[f"test/{cls}/t0.png"] = _png(colours[0], (48, 48))
        files[f"train/{cls}/notes.txt"] = b"not an image"
        files[f"train/{cls}/.hidden.png"] = b"\x00junk"
    files["README.md"] = b"top-level files are ignored"
    return files


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, blob in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    return root


def _write_archive(path: Path, files: dict[str, bytes], prefix: str = "", fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w:xz", format=fmt) as tf:
        for rel in sorted(files, reverse=True):  # archive order must not matter
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(files[rel])
            tf.addfile(info, io.BytesIO(files[rel]))
    return path


def _expected() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    classes = sorted(COLOURS)
    train = [c for cls in classes for c in COLOURS[cls]]
    test = [COLOURS[cls][0] for cls in classes]

    def img(colours: list[tuple[int, int, int]]) -> torch.Tensor:
        return torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, 3, 32, 32)

    return img(train), torch.arange(3).repeat_interleave(4), img(test), torch.arange(3)


def _assert_tiny(data: D.ImageData) -> None:
    tx, ty, vx, vy = _expected()
    assert data.classes == ["apple", "mango", "zebra"]
    assert data.num_classes == 3 and data.spec.mean == (0.5, 0.5, 0.5)
    assert data.spec.std == (0.5, 0.5, 0.5)
    assert data.train_x.shape == (12, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert torch.equal(data.train_y, ty) and torch.equal(data.test_y, vy)
    assert torch.equal(data.train_x, tx)
    assert torch.equal(data.test_x, vx)


def test_imagefolder_from_folder(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "tiny", _tree_files())
    data = load_dataset("imagefolder", root, cache_dir=tmp_path / "cache", progress=False)
    _assert_tiny(data)
    assert data.source == f"folder {root}"
    assert data.name == "imagefolder"


def test_imagefolder_from_archive_variants(tmp_path: Path) -> None:
    files = _tree_files()
    plain = _write_archive(tmp_path / "tiny.tar.xz", files)
    wrapped = _write_archive(tmp_path / "wrapped.tar.xz", files, prefix="tiny/")
    # a GNU long-name member (> 100 characters) takes the tarfile fallback path
    long = dict(files)
    long[f"train/apple/{'x' * 120}.png"] = long.pop("train/apple/img3.png")
    gnu = _write_archive(tmp_path / "gnu.tar.xz", long, fmt=tarfile.GNU_FORMAT)
    for path in (plain, wrapped):
        data = load_dataset("imagefolder", path, cache_dir=tmp_path / "cache", progress=False)
        _assert_tiny(data)
        assert data.source == f"archive {path}"
    data = load_dataset("imagefolder", gnu, cache=False, progress=False)
    tx, ty, _, _ = _expected()
    assert torch.equal(data.train_y, ty)
    # 'xxx…' sorts after img0..img2, so the moved image keeps its position
    assert torch.equal(data.train_x, tx)
    # an unregistered name found in a folder holding <name>.tar.xz
    data = load_dataset("tiny", tmp_path, cache=False, progress=False)
    _assert_tiny(data)


def test_cache_written_atomically_and_rebuilt_when_corrupt(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "tiny", _tree_files())
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
    assert not first.from_cache
    files = list((cache / "datasets").iterdir())
    assert [f.name for f in files] == [Path(first.cache_file).name]  # no temp file left over
    assert files[0].name.startswith("imagefolder-") and files[0].suffix == ".safetensors"
    assert load_dataset("imagefolder", root, cache_dir=cache, progress=False).from_cache
    files[0].write_bytes(os.urandom(1000))
    rebuilt = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
    assert not rebuilt.from_cache
    _assert_tiny(rebuilt)
    assert load_dataset("imagefolder", root, cache_dir=cache, progress=False).from_cache
    # a changed file changes the folder's key: the stale cache is not used
    (root / "train/apple/img0.png").write_bytes(_png((5, 6, 7), (32, 32)))
    changed = load_dataset("imagefolder", root, cache_dir=cache, progress=False)
    assert not changed.from_cache and changed.train_x[0, :, 0, 0].tolist() == [5, 6, 7]


def test_jpeg_and_grayscale_images(tmp_path: Path) -> None:
    files = _tree_files()
    buf = io.BytesIO()
    Image.new("L", (32, 32), 90).save(buf, format="JPEG", quality=95)
    files["train/mango/img1.png"] = buf.getvalue()  # a JPEG, whatever its name says
    data = load_dataset("imagefolder", _write_folder(tmp_path / "t", files), cache=False, progress=False)
    img = data.train_x[4 + 1]
    assert (img.int() - 90).abs().max() <= 1  # grey JPEG -> three equal channels
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])


@pytest.mark.parametrize("fmt", ["ustar-prefix", "gnu-longname", "pax-longname"])
def test_fast_tar_reader_agrees_with_tarfile(tmp_path: Path, fmt: str) -> None:
    """The fast header reader handles plain ustar/GNU members (with a ustar prefix too) and hands
    anything else (GNU long names, pax headers) to tarfile; both give the same dataset."""
    import lzma

    files = _tree_files()
    blob = files.pop("train/apple/img3.png")
    if fmt == "ustar-prefix":  # a 100+ character path that ustar splits into prefix + name
        files[f"train/apple/{'y' * 90}/img3.png"] = blob
        path = _write_archive(tmp_path / "a.tar.xz", files, fmt=tarfile.USTAR_FORMAT)
        with lzma.open(path) as f:
            fast = sorted(D._iter_tar_fast(f))
        assert fast == sorted(D._iter_tar_stdlib(path))
        assert any(name.endswith("y" * 90 + "/img3.png") for name, _, _ in fast)
    else:
        files[f"train/apple/{'x' * 120}.png"] = blob
        form = tarfile.GNU_FORMAT if fmt == "gnu-longname" else tarfile.PAX_FORMAT
        path = _write_archive(tmp_path / "a.tar.xz", files, fmt=form)
        with lzma.open(path) as f, pytest.raises(D._UnsupportedTar):
            list(D._iter_tar_fast(f))
    data = load_dataset("imagefolder", path, cache=False, progress=False)
    tx, ty, _, _ = _expected()  # the renamed image still sorts last in its class
    assert torch.equal(data.train_x, tx) and torch.equal(data.train_y, ty)


# --------------------------------------------------------------------------- torchvision fallback


def test_torchvision_cifar_fallback(tmp_path: Path, monkeypatch) -> None:
    """Without a local copy, CIFAR comes from torchvision: HWC arrays become CHW tensors."""
    import torchvision.datasets as tvd

    calls: list[tuple[str, bool, bool]] = []

    class FakeCIFAR10:
        classes = CIFAR10_CLASSES

        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, train, download))
            n = 6 if train else 2
            rng = np.random.default_rng(n)
            self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(range(n))

    monkeypatch.delenv("BD4NN_DATA", raising=False)
    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    cache = tmp_path / "cache"
    data = load_dataset("cifar10", cache_dir=cache, download=False, progress=False)
    assert calls == [(str(cache / "torchvision"), True, False), (str(cache / "torchvision"), False, False)]
    hwc = np.random.default_rng(6).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    assert data.train_x.shape == (6, 3, 32, 32)
    assert data.train_x[4, 2, 7, 9] == hwc[4, 7, 9, 2] and data.train_x[1, 0, 31, 0] == hwc[1, 31, 0, 0]
    assert data.train_y.tolist() == list(range(6)) and data.train_y.dtype == torch.int64
    assert data.source == f"torchvision {cache / 'torchvision'}" and data.classes == CIFAR10_CLASSES
    again = load_dataset("cifar10", cache_dir=cache, download=False, progress=False)
    assert again.from_cache and len(calls) == 2  # torchvision not touched again
    assert torch.equal(again.train_x, data.train_x)


def test_torchvision_gtsrb_fallback_resizes(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets as tvd

    samples = {
        "train": [((50, 40), (255, 0, 0), 0), ((32, 32), (0, 9, 0), 42), ((15, 15), (3, 4, 5), 7)],
        "test": [((64, 64), (100, 150, 200), 5)],
    }

    class FakeGTSRB:
        def __init__(self, root: str, split: str, download: bool) -> None:
            self.items = samples[split]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int):
            size, colour, label = self.items[i]
            return Image.new("RGB", size, colour), label

    monkeypatch.delenv("BD4NN_DATA", raising=False)
    monkeypatch.setattr(tvd, "GTSRB", FakeGTSRB)
    data = load_dataset("gtsrb", cache=False, cache_dir=tmp_path, progress=False)
    assert data.classes == [f"{i:05d}" for i in range(43)] and data.num_classes == 43
    assert data.train_x.shape == (3, 3, 32, 32) and data.test_x.shape == (1, 3, 32, 32)
    assert data.train_y.tolist() == [0, 42, 7] and data.test_y.tolist() == [5]
    for img, (_, colour, _) in zip(data.train_x, samples["train"]):
        assert torch.equal(img, torch.tensor(colour, dtype=torch.uint8)[:, None, None].expand(3, 32, 32))


# --------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tar.xz"
    with pytest.raises(DatasetError, match="does not exist") as e:
        load_dataset("cifar10", missing, cache=False)
    assert str(missing) in str(e.value)


def test_error_corrupt_archive(tmp_path: Path) -> None:
    bad = tmp_path / "x.tar.xz"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(DatasetError, match="corrupt or not a .tar.xz") as e:
        load_dataset("imagefolder", bad, cache=False, progress=False)
    assert str(bad) in str(e.value)
    # a real archive cut in half
    good = _write_archive(tmp_path / "tiny.tar.xz", _tree_files())
    cut = tmp_path / "cut.tar.xz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError, match="corrupt") as e:
        load_dataset("imagefolder", cut, cache=False, progress=False)
    assert str(cut) in str(e.value)


def test_error_archive_without_splits(tmp_path: Path) -> None:
    path = _write_archive(tmp_path / "flat.tar.xz", {"a/x.png": _png((1, 1, 1), (32, 32)), "b.png": b""})
    with pytest.raises(DatasetError, match="train/ and test/") as e:
        load_dataset("imagefolder", path, cache=False, progress=False)
    assert str(path) in str(e.value)
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(DatasetError, match="neither train/ and test/") as e:
        load_dataset("imagefolder", folder, cache=False)
    assert str(folder) in str(e.value)


def test_error_class_count_mismatch(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "tiny", _tree_files())
    with pytest.raises(DatasetError, match="found 3 class folders") as e:
        load_dataset("cifar10", root, cache=False, progress=False)
    assert str(root) in str(e.value) and "cifar10 has 10" in str(e.value)
    archive = _write_archive(tmp_path / "tiny.tar.xz", _tree_files())
    with pytest.raises(DatasetError, match="cifar10 has 10") as e:
        load_dataset("cifar10", archive, cache=False, progress=False)
    assert str(archive) in str(e.value)


def test_error_empty_class_folder(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "tiny", _tree_files())
    (root / "test" / "kiwi").mkdir()
    (root / "train" / "kiwi").mkdir()
    (root / "train" / "kiwi" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no images in class folder") as e:
        load_dataset("imagefolder", root, cache=False)
    assert "kiwi" in str(e.value) and str(root) in str(e.value)


def test_error_offline_torchvision(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BD4NN_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="no local copy of cifar100 found") as e:
        load_dataset("cifar100", cache_dir=tmp_path / "cache", download=False, progress=False)
    msg = str(e.value)
    assert str(tmp_path) in msg and "cifar100.tar.xz" in msg and "\n" not in msg


def test_error_unknown_name_and_generic_without_root(monkeypatch) -> None:
    monkeypatch.delenv("BD4NN_DATA", raising=False)
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="needs root="):
        load_dataset("imagefolder")


def test_data_folder_follows_one_rule(tmp_path, monkeypatch):
    """given > $BD4NN_DATA > the first existing fallback; with ``holding``, the first that holds it."""
    from bd4nn.data import DATA_ENV, data_folder

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b):
        d.mkdir()
    (b / "cifar10.tar.xz").write_bytes(b"")
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert data_folder() is None
    assert data_folder(fallbacks=[c, a, b]) == a  # c does not exist
    monkeypatch.setenv(DATA_ENV, str(c))
    assert data_folder(fallbacks=[a]) == c  # set, even if missing: the loader then says so
    assert data_folder(a, fallbacks=[b]) == a
    assert data_folder(a, fallbacks=[b], holding="cifar10") == b
    assert data_folder(a, holding="gtsrb") == a

