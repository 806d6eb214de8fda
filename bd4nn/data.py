"""Image datasets for bd4nn: CIFAR-10, CIFAR-100, GTSRB and any ImageFolder tree.

Every dataset is returned as an :class:`ImageData`: CPU tensors of uint8 images ``(N, 3, 32, 32)``
and int64 labels ``(N,)`` for the train and test split, the class names, and where it came from.
Normalisation is left to the caller (``spec.mean`` / ``spec.std``).

Where the images come from (first match wins):

a. ``root=`` given explicitly: a ``.tar.xz`` archive, an extracted ImageFolder directory holding
   ``train/`` and ``test/``, or a folder holding ``<name>.tar.xz`` or ``<name>/``;
b. the environment variable ``BD4NN_DATA``: a folder holding ``<name>.tar.xz`` or ``<name>/``;
c. torchvision (CIFAR10, CIFAR100, GTSRB), downloaded when ``download=True`` into
   ``<cache_dir>/torchvision`` (by default ``~/.cache/bd4nn/torchvision``).

Archive and folder layout (the torchvision ``ImageFolder`` layout, one level per split)::

    train/<class folder>/<image file>
    test/<class folder>/<image file>

Class ``i`` is the ``i``-th class folder of ``train/`` in sorted order; images are taken in the
order (split, class, file name). Archives are read as a stream and never unpacked to disk. JPEGs
are decoded with ``torchvision.io.decode_jpeg`` (bit-identical to PIL's decode, and about three
times faster on small images); other formats, and images that are not 32x32, go through PIL:
``convert("RGB")`` and a bilinear resize to 32x32.

Generic ImageFolder datasets: ``load_dataset("imagefolder", root=PATH)`` -- or any name that is not
registered, as long as ``root=`` (or ``BD4NN_DATA``) points at it -- loads any tree in the layout
above. Its classes are the class folder names, and its normalisation is mean 0.5 / std 0.5 per
channel (which maps [0, 1] to [-1, 1]); register a :class:`DatasetSpec` to use real statistics.

Cache: the first load decodes the images and stores the tensors in
``<cache_dir>/datasets/<name>-<sha256[:16]>.safetensors`` (``cache_dir`` defaults to
``$BD4NN_CACHE`` or ``~/.cache/bd4nn``). The key is the sha256 of the archive's bytes, of the
folder's file list (relative paths, sizes, mtimes), or of the torchvision name and root. The file
is written to a temporary name and moved into place with ``os.replace``; a cache file that fails
to load or does not match is rebuilt. The file also stores a sha256 of its decoded tensors,
checked on every load, so a tampered or corrupt cache is rebuilt, never used silently. No pickle
is read or written anywhere.

The defenders' clean data is one seeded random 5% of the training set: :func:`clean_split` and
:func:`defender_data` (METHODS.md section 1).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import lzma
import os
import re
import stat
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from bd4nn.progress import bar as progress_bar

from bd4nn.errors import UserError

__all__ = [
    "DatasetError",
    "DatasetSpec",
    "DATASETS",
    "ImageData",
    "register_dataset",
    "list_datasets",
    "get_spec",
    "load_dataset",
    "clean_split",
    "defender_data",
    "seeded_subset",
    "training_subset",
    "evaluation_subset",
    "GENERIC_NAME",
    "IMAGE_SIZE",
    "DATA_ENV",
    "CACHE_ENV",
    "data_folder",
    "cache_folder",
]

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
GENERIC_NAME = "imagefolder"
# The one place that reads these variables (issue 13): every entry point asks data_folder() and
# cache_folder(), so `pytest bench/`, `bd4nn` and the benchmark scripts find the same files.
DATA_ENV = "BD4NN_DATA"
CACHE_ENV = "BD4NN_CACHE"
SPLITS = ("train", "test")
#: Extensions that count as images (the set torchvision's ImageFolder accepts), lower case.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Bump when the decoded content of a source would change (decoder, resize, ordering): old
#: cache files then stop matching and are rebuilt.
CACHE_FORMAT = "bd4nn-data-1"
_DECODE_CHUNK = 1024


class DatasetError(UserError):
    """A dataset cannot be found or read; the message names the file and what to do."""


@dataclass(frozen=True)
class DatasetSpec:
    """What bd4nn needs to know about a dataset besides its images."""

    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = IMAGE_SIZE


# (train_x uint8 (N,3,32,32), train_y int64 (N,), test_x, test_y, class names)
Splits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]
#: ``loader(root, download, progress) -> Splits``; raises on failure (e.g. offline).
TorchvisionLoader = Callable[[Path, bool, bool], Splits]

DATASETS: dict[str, DatasetSpec] = {}
_TORCHVISION_LOADERS: dict[str, TorchvisionLoader] = {}


def register_dataset(
    spec: DatasetSpec, torchvision_loader: TorchvisionLoader | None = None
) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS`; ``torchvision_loader`` is the fallback when no local copy
    exists (``None``: the dataset must come from an archive or folder)."""
    if spec.name == GENERIC_NAME:
        raise ValueError(f"{GENERIC_NAME!r} is reserved for generic ImageFolder datasets")
    if spec.image_size != IMAGE_SIZE:
        raise ValueError(f"{spec.name}: only {IMAGE_SIZE}x{IMAGE_SIZE} images are supported")
    DATASETS[spec.name] = spec
    if torchvision_loader is not None:
        _TORCHVISION_LOADERS[spec.name] = torchvision_loader
    else:
        _TORCHVISION_LOADERS.pop(spec.name, None)
    return spec


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted (``imagefolder`` is always available besides)."""
    return sorted(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The registered spec of ``name``; an unknown name raises :class:`DatasetError`."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(
            f"unknown dataset {name!r}; known: {', '.join(list_datasets())} "
            f"(or load any ImageFolder tree with load_dataset({GENERIC_NAME!r}, root=PATH))"
        ) from None


def _generic_spec(name: str, num_classes: int) -> DatasetSpec:
    return DatasetSpec(name, num_classes, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass
class ImageData:
    """A dataset in memory: uint8 images ``(N, 3, 32, 32)`` and int64 labels, on the CPU."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str  # "archive /p/cifar10.tar.xz", "folder /p", "torchvision /root"
    spec: DatasetSpec
    cache_file: str | None = None  # the cache file read or written, None if not cached
    from_cache: bool = False  # True when the tensors were read from cache_file

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def __repr__(self) -> str:
        return (
            f"ImageData({self.name!r}, train={tuple(self.train_x.shape)}, "
            f"test={tuple(self.test_x.shape)}, classes={self.num_classes}, source={self.source!r})"
        )


# --------------------------------------------------------------------------- listing sources


# {split: {class: [(relative path inside the class folder, item)]}}; an item is the image's raw
# bytes (archives) or its Path (folders).
_Tree = dict[str, dict[str, list[tuple[str, object]]]]


def _is_image(filename: str) -> bool:
    return not filename.startswith(".") and filename.lower().endswith(IMG_EXTENSIONS)


class _UnsupportedTar(Exception):
    """The fast tar reader met something it does not handle; use tarfile instead."""


_ZERO_BLOCK = bytes(512)


def _iter_tar_fast(f: BinaryIO) -> Iterator[tuple[str, bool, bytes]]:
    """Yield ``(name, is_dir, data)`` for the plain ustar/GNU members of an uncompressed tar
    stream. About twice as fast as :mod:`tarfile` on 60,000 small members; anything beyond
    regular files and directories with short names (long names, pax headers, links, base-256
    sizes, bad checksums) raises :class:`_UnsupportedTar` so the caller can fall back."""
    while True:
        hdr = f.read(512)
        if len(hdr) < 512 or hdr == _ZERO_BLOCK:
            if len(hdr) not in (0, 512):
                raise _UnsupportedTar("truncated header")
            return
        try:
            chksum = int(hdr[148:156].strip(b"\0 ") or b"0", 8)
            size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise _UnsupportedTar("non-octal header field") from None
        if chksum != sum(hdr) - sum(hdr[148:156]) + 256:
            raise _UnsupportedTar("header checksum mismatch")
        typeflag = hdr[156:157]
        if typeflag not in (b"0", b"\0", b"5"):
            raise _UnsupportedTar(f"member type {typeflag!r}")
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:263] == b"ustar\x00":  # POSIX ustar: long names are split into prefix/name
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        data = f.read(size)
        f.read(-size % 512)
        if len(data) != size:
            raise _UnsupportedTar("truncated member")
        yield name.decode("utf-8", "surrogateescape"), typeflag == b"5", data


def _iter_tar_stdlib(path: Path) -> Iterator[tuple[str, bool, bytes]]:
    with tarfile.open(path, "r|xz") as tf:
        for m in tf:
            if m.isdir():
                yield m.name, True, b""
            elif m.isfile():
                fobj = tf.extractfile(m)
                yield m.name, False, fobj.read() if fobj is not None else b""


def _tree_from_members(
    members: Iterator[tuple[str, bool, bytes]],
) -> tuple[_Tree, set[tuple[str, str]]]:
    """Sort archive members into the split/class tree (also records class dirs, to spot empty
    ones). A single wrapping folder (``cifar10/train/...``) is stripped."""
    files: list[tuple[list[str], bytes]] = []
    dirs: list[list[str]] = []
    for name, is_dir, data in members:
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if not parts:
            continue
        if is_dir:
            dirs.append(parts)
        else:
            files.append((parts, data))
    has_split = any(parts[0] in SPLITS for parts, _ in files)
    heads = {parts[0] for parts, _ in files if len(parts) > 1}
    strip = 1 if not has_split and len(heads) == 1 else 0
    tree: _Tree = {s: {} for s in SPLITS}
    class_dirs: set[tuple[str, str]] = set()
    for parts in dirs:
        parts = parts[strip:]
        if len(parts) == 2 and parts[0] in SPLITS and not parts[1].startswith("."):
            class_dirs.add((parts[0], parts[1]))
    for parts, data in files:
        parts = parts[strip:]
        if len(parts) < 3 or parts[0] not in SPLITS or parts[1].startswith("."):
            continue  # README, files directly in train/, hidden folders, ...
        class_dirs.add((parts[0], parts[1]))
        if _is_image(parts[-1]):
            tree[parts[0]].setdefault(parts[1], []).append(("/".join(parts[2:]), data))
    return tree, class_dirs


def _corrupt(path: Path, e: BaseException) -> DatasetError:
    return DatasetError(
        f"{path} is corrupt or not a .tar.xz archive ({type(e).__name__}: {e}); re-download it "
        f"or re-create it with `tar cf - train test | xz`"
    )


def _read_archive(path: Path, progress: bool) -> tuple[_Tree, set[tuple[str, str]]]:
    """Read every member of a .tar.xz in one streaming pass (nothing is written to disk)."""
    try:
        with open(path, "rb") as raw, lzma.LZMAFile(raw) as f, progress_bar(
            total=path.stat().st_size, unit="B", unit_scale=True, disable=not progress,
            desc=f"reading {path.name}", leave=False,
        ) as bar:

            def members() -> Iterator[tuple[str, bool, bytes]]:
                last = 0
                for k, item in enumerate(_iter_tar_fast(f)):  # type: ignore[arg-type]
                    if progress and k % 1000 == 0:
                        pos = raw.tell()
                        bar.update(pos - last)
                        last = pos
                    yield item

            return _tree_from_members(members())
    except _UnsupportedTar as e:
        log.debug("%s: fast tar reader gave up (%s); using tarfile", path, e)
    except (lzma.LZMAError, EOFError, OSError) as e:
        raise _corrupt(path, e) from None
    try:
        return _tree_from_members(_iter_tar_stdlib(path))
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
        raise _corrupt(path, e) from None


def _scan_folder(root: Path) -> tuple[_Tree, set[tuple[str, str]]]:
    """List the image files of an extracted ImageFolder tree (recursively inside class folders,
    like torchvision's ImageFolder)."""
    tree: _Tree = {s: {} for s in SPLITS}
    class_dirs: set[tuple[str, str]] = set()
    for split in SPLITS:
        split_dir = root / split
        for cls in sorted(os.listdir(split_dir)):
            cdir = split_dir / cls
            if cls.startswith(".") or not cdir.is_dir():
                continue
            class_dirs.add((split, cls))
            items: list[tuple[str, object]] = []
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                rel = Path(dirpath).relative_to(cdir)
                for fn in filenames:
                    if _is_image(fn):
                        items.append(((rel / fn).as_posix(), Path(dirpath) / fn))
            if items:
                tree[split][cls] = items
    return tree, class_dirs


def _folder_digest(tree: _Tree) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}\nfolder\n".encode())
    for split in SPLITS:
        for cls in sorted(tree[split]):
            for rel, p in sorted(tree[split][cls]):
                st = os.stat(p)  # type: ignore[arg-type]
                h.update(f"{split}/{cls}/{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}\narchive\n".encode())
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({e}); check its permissions") from None
    return h.hexdigest()


def _check_tree(
    tree: _Tree, class_dirs: set[tuple[str, str]], spec: DatasetSpec | None, where: str, name: str
) -> list[str]:
    """Validate the layout and return the sorted class names."""
    train_dirs = sorted(c for s, c in class_dirs if s == "train")
    test_dirs = sorted(c for s, c in class_dirs if s == "test")
    if not train_dirs or not test_dirs:
        missing = " and ".join(f"{s}/" for s, d in zip(SPLITS, (train_dirs, test_dirs)) if not d)
        raise DatasetError(
            f"{where} has no class folders in {missing}; expected train/<class>/<image> and "
            f"test/<class>/<image> (the ImageFolder layout)"
        )
    for split, dirs in zip(SPLITS, (train_dirs, test_dirs)):
        for cls in dirs:
            if cls not in tree[split]:
                raise DatasetError(
                    f"no images in class folder {split}/{cls} of {where} (accepted: "
                    f"{', '.join(IMG_EXTENSIONS)}); add images or remove the folder"
                )
    extra = sorted(set(test_dirs) - set(train_dirs))
    if extra:
        raise DatasetError(
            f"{where}: test/ has class folders that train/ lacks ({', '.join(extra[:5])}); "
            f"both splits must use the same class folder names"
        )
    if spec is not None and len(train_dirs) != spec.num_classes:
        raise DatasetError(
            f"found {len(train_dirs)} class folders in {where} (train/), {name} has "
            f"{spec.num_classes}; point root= at a {name} copy, or load it with "
            f"load_dataset({GENERIC_NAME!r}, root=...)"
        )
    return train_dirs


# --------------------------------------------------------------------------- decoding


def _pil_decode(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


try:  # torchvision's libjpeg-turbo decoder; PIL is the fallback for everything it cannot do
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    def _jpeg_batch(blobs: Sequence[bytes]) -> list[torch.Tensor] | None:
        ts = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(ts, mode=ImageReadMode.RGB)
        except Exception:  # one bad file fails the whole batch; redo it image by image
            return None

except Exception:  # pragma: no cover - torchvision without image support

    def _jpeg_batch(blobs: Sequence[bytes]) -> list[torch.Tensor] | None:
        return None


def _decode_all(
    blobs: Sequence[bytes], names: Sequence[str], where: str, desc: str, progress: bool
) -> torch.Tensor:
    """Decode encoded images into one uint8 tensor ``(N, 3, 32, 32)``."""
    n = len(blobs)
    out = torch.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    with progress_bar(total=n, unit="img", desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, n, _DECODE_CHUNK):
            idx = range(start, min(start + _DECODE_CHUNK, n))
            jpegs = [i for i in idx if blobs[i][:3] == b"\xff\xd8\xff"]
            done: set[int] = set()
            if jpegs:
                decoded = _jpeg_batch([blobs[i] for i in jpegs])
                if decoded is not None:
                    for i, img in zip(jpegs, decoded):
                        if img.shape == (3, IMAGE_SIZE, IMAGE_SIZE):
                            out[i] = img
                            done.add(i)
            for i in idx:
                if i in done:
                    continue
                try:
                    out[i] = _pil_decode(blobs[i])
                except Exception as e:
                    raise DatasetError(
                        f"cannot decode {where}: {names[i]} ({type(e).__name__}: {e}); the file "
                        f"is corrupt or not an image, remove or replace it"
                    ) from None
            bar.update(len(idx))
    return out


def _decode_tree(
    tree: _Tree, classes: list[str], where: str, name: str, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    result: list[torch.Tensor] = []
    index = {c: i for i, c in enumerate(classes)}
    for split in SPLITS:
        blobs: list[bytes] = []
        names: list[str] = []
        labels: list[int] = []
        for cls in sorted(tree[split]):
            for rel, item in sorted(tree[split][cls], key=lambda t: t[0]):
                if isinstance(item, Path):
                    try:
                        item = item.read_bytes()
                    except OSError as e:
                        raise DatasetError(f"cannot read {item} ({e})") from None
                blobs.append(item)  # type: ignore[arg-type]
                names.append(f"{split}/{cls}/{rel}")
                labels.append(index[cls])
        x = _decode_all(blobs, names, where, f"decoding {name} {split}", progress)
        result += [x, torch.tensor(labels, dtype=torch.int64)]
    return result[0], result[1], result[2], result[3]


# --------------------------------------------------------------------------- torchvision


def _pil_to_chw(im: Image.Image) -> torch.Tensor:
    im = im.convert("RGB")
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def _tv_cifar(cls_name: str) -> TorchvisionLoader:
    def load(root: Path, download: bool, progress: bool) -> Splits:
        import torchvision.datasets as tvd

        out: list[torch.Tensor] = []
        classes: list[str] = []
        for train in (True, False):
            ds = getattr(tvd, cls_name)(str(root), train=train, download=download)
            hwc = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))
            out.append(hwc.permute(0, 3, 1, 2).contiguous())
            out.append(torch.as_tensor(ds.targets, dtype=torch.int64))
            classes = list(ds.classes)
        return out[0], out[1], out[2], out[3], classes

    return load


def _tv_gtsrb(root: Path, download: bool, progress: bool) -> Splits:
    import torchvision.datasets as tvd

    out: list[torch.Tensor] = []
    for split in SPLITS:
        ds = tvd.GTSRB(str(root), split=split, download=download)
        xs = torch.empty((len(ds), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
        ys = torch.empty(len(ds), dtype=torch.int64)
        bar = progress_bar(range(len(ds)), desc=f"decoding gtsrb {split}", disable=not progress, leave=False)
        for i in bar:
            im, y = ds[i]
            xs[i] = _pil_to_chw(im)
            ys[i] = int(y)
        out += [xs, ys]
    # the same names as the class folders of the offline archive (five-digit ClassId)
    return out[0], out[1], out[2], out[3], [f"{i:05d}" for i in range(43)]


# Normalisation statistics: the usual published per-channel mean/std of each training set
# (on [0, 1] pixel values), as used throughout the backdoor-defence literature.
register_dataset(
    DatasetSpec("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    _tv_cifar("CIFAR10"),
)
register_dataset(
    DatasetSpec("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    _tv_cifar("CIFAR100"),
)
register_dataset(
    DatasetSpec("gtsrb", 43, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669)),
    _tv_gtsrb,
)


# --------------------------------------------------------------------------- cache


def cache_folder() -> Path:
    """bd4nn's cache folder (decoded datasets, the harness's default databases): ``$BD4NN_CACHE``,
    else ``~/.cache/bd4nn``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bd4nn"


def data_folder(given: str | os.PathLike | None = None, fallbacks: Sequence[str | os.PathLike] = (), *,
                holding: str | None = None) -> Path | None:
    """The folder of dataset archives, by the one rule every entry point follows: the folder the
    user gave, else ``$BD4NN_DATA``, else the first of ``fallbacks`` that exists (e.g. the
    ``../shared/data`` of a development checkout); None if there is none (torchvision then
    downloads). With ``holding`` (a dataset name), the first of these that holds
    ``<name>.tar.xz`` or ``<name>/`` wins; if none does, the first given or set one."""
    chosen = [Path(c).expanduser() for c in (given, os.environ.get(DATA_ENV)) if c]
    extra = [Path(c).expanduser() for c in fallbacks if c]
    if holding is not None:
        for cand in chosen + extra:
            if cand.is_dir() and _find_in(cand, holding) is not None:
                return cand
    if chosen:
        return chosen[0]
    return next((c for c in extra if c.is_dir()), None)


def _cache_path(cache_dir: Path, name: str, digest: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return cache_dir / "datasets" / f"{safe}-{digest[:16]}.safetensors"


def _content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the decoded tensors (names, dtypes, shapes and bytes, in a fixed order): the
    cache is checked against it on every load, so a tampered cache is rebuilt, never used."""
    h = hashlib.sha256()
    for k in ("train_x", "train_y", "test_x", "test_y"):
        t = tensors[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _read_cache(path: Path, digest: str) -> tuple[Splits, str] | None:
    """The cached tensors, or None if the file is absent, unreadable or does not match."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("sha256") != digest:
                raise ValueError("key mismatch")
            t = {k: f.get_tensor(k) for k in ("train_x", "train_y", "test_x", "test_y")}
        classes = json.loads(meta["classes"])
        shape = (3, IMAGE_SIZE, IMAGE_SIZE)
        for s in SPLITS:
            x, y = t[f"{s}_x"], t[f"{s}_y"]
            if x.dtype != torch.uint8 or tuple(x.shape[1:]) != shape or y.dtype != torch.int64:
                raise ValueError("bad dtype or shape")
            if y.shape != (x.shape[0],):
                raise ValueError("labels do not match images")
            if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(classes):
                raise ValueError("labels out of range")
        if meta.get("content_sha256") != _content_sha256(t):  # tampered or corrupt tensors
            raise ValueError("its tensors do not match the hash stored with them")
        splits = (t["train_x"], t["train_y"], t["test_x"], t["test_y"], classes)
        return splits, meta.get("source", "")
    except Exception as e:
        log.warning("dataset cache %s is unusable (%s); rebuilding it", path, e)
        return None


def _write_cache(path: Path, digest: str, splits: Splits, source: str, name: str) -> bool:
    from safetensors.torch import save_file

    train_x, train_y, test_x, test_y, classes = splits
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        tensors = {
            "train_x": train_x.contiguous(), "train_y": train_y.contiguous(),
            "test_x": test_x.contiguous(), "test_y": test_y.contiguous(),
        }
        meta = {
            "format": CACHE_FORMAT, "sha256": digest, "name": name,
            "classes": json.dumps(classes), "source": source, "content_sha256": _content_sha256(tensors),
        }
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(tmp, path)
        return True
    except Exception as e:  # a cache that cannot be written must not fail the load
        log.warning("cannot write dataset cache %s (%s); continuing without it", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        return False


# --------------------------------------------------------------------------- loading


def _find_in(folder: Path, name: str) -> Path | None:
    for cand in (folder / f"{name}.tar.xz", folder / name):
        if cand.exists():
            return cand
    return None


def _resolve_local(name: str, root: str | os.PathLike | None) -> tuple[Path | None, list[str]]:
    """The local archive/folder to load, and the places looked in (for error messages)."""
    if root is not None:
        p = Path(root).expanduser()
        if not p.exists():
            raise DatasetError(
                f"{p} does not exist; pass root= an existing .tar.xz archive or folder"
            )
        if p.is_file() or ((p / "train").is_dir() and (p / "test").is_dir()):
            return p, [str(p)]
        found = _find_in(p, name)
        if found is None:
            raise DatasetError(
                f"{p} holds neither train/ and test/ nor {name}.tar.xz or {name}/; pass root= "
                f"the archive or the extracted folder itself"
            )
        return found, [str(p)]
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        found = _find_in(p, name) if p.is_dir() else None
        return found, [f"{p} ({DATA_ENV})"]
    return None, [f"{DATA_ENV} (not set)"]


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
    cache: bool = True,
) -> ImageData:
    """Load dataset ``name`` as uint8 CPU tensors, from ``root``, ``$BD4NN_DATA`` or torchvision.

    ``name`` is a registered dataset (:func:`list_datasets`) or, with a local source, any other
    name (``"imagefolder"`` by convention): then classes come from the folder names and the
    normalisation is mean/std 0.5. ``cache=False`` neither reads nor writes the cache.
    Raises :class:`DatasetError` with a one-line message naming the path on every failure.
    """
    spec = DATASETS.get(name)
    local, looked = _resolve_local(name, root)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else cache_folder()
    if local is None and spec is None:
        if name == GENERIC_NAME:
            raise DatasetError(
                f"load_dataset({GENERIC_NAME!r}) needs root= an ImageFolder directory or a "
                f".tar.xz archive of one"
            )
        get_spec(name)  # raises: unknown name, listing the known ones

    if local is None:  # (c) torchvision
        assert spec is not None
        tv_root = cdir / "torchvision"
        source = f"torchvision {tv_root}"
        key = f"{CACHE_FORMAT}\ntorchvision\n{name}\n{tv_root.resolve()}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        loader = _TORCHVISION_LOADERS.get(name)

        def reader() -> Splits:
            if loader is None:
                raise DatasetError(
                    f"no local copy of {name} found (looked in {'; '.join(looked)}); set "
                    f"BD4NN_DATA to a folder holding {name}.tar.xz or pass root="
                )
            try:
                return loader(tv_root, download, progress)
            except Exception as e:
                first = (str(e).splitlines() or [""])[0]
                how = "connect to the internet"
                if not download:
                    how = "call with download=True and " + how
                raise DatasetError(
                    f"no local copy of {name} found (looked in {'; '.join(looked + [str(tv_root)])}); "
                    f"set BD4NN_DATA to a folder holding {name}.tar.xz or pass root=, or {how} "
                    f"(torchvision: {type(e).__name__}: {first})"
                ) from None

    elif local.is_file():  # an archive
        source = f"archive {local}"
        digest = _file_digest(local)

        def reader() -> Splits:
            tree, dirs = _read_archive(local, progress)
            classes = _check_tree(tree, dirs, spec, str(local), name)
            return (*_decode_tree(tree, classes, str(local), name, progress), classes)

    else:  # an extracted folder
        if not ((local / "train").is_dir() and (local / "test").is_dir()):
            raise DatasetError(
                f"{local} has no train/ and test/ folders; expected train/<class>/<image> and "
                f"test/<class>/<image> (the ImageFolder layout)"
            )
        source = f"folder {local}"
        tree, dirs = _scan_folder(local)
        classes_ = _check_tree(tree, dirs, spec, str(local), name)
        digest = _folder_digest(tree)

        def reader() -> Splits:
            return (*_decode_tree(tree, classes_, str(local), name, progress), classes_)

    path = _cache_path(cdir, name, digest) if cache else None
    hit = _read_cache(path, digest) if path is not None else None
    if hit is not None:
        splits, from_cache = hit[0], True
    else:
        splits, from_cache = reader(), False
        if path is not None and not _write_cache(path, digest, splits, source, name):
            path = None
    train_x, train_y, test_x, test_y, classes = splits
    if spec is None:
        spec = _generic_spec(name, len(classes))
    elif len(classes) != spec.num_classes:
        raise DatasetError(
            f"{source} gave {len(classes)} classes, {name} has {spec.num_classes}; check the copy"
        )
    return ImageData(
        name, train_x, train_y, test_x, test_y, list(classes), source, spec,
        cache_file=str(path) if path is not None else None, from_cache=from_cache,
    )


# --------------------------------------------------------------------------- clean split


def clean_split(n: int, fraction: float = 0.05, seed: int = 0) -> torch.Tensor:
    """Sorted int64 indices of ``round(n * fraction)`` distinct samples out of ``range(n)``,
    drawn with ``torch.randperm`` on a ``torch.Generator`` seeded with ``seed`` (the defenders'
    clean data, METHODS.md section 1: 2,500 of CIFAR-10's 50,000 at the defaults)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = round(n * fraction)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


def defender_data(
    data: ImageData, fraction: float = 0.05, seed: int = 0, images: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of the seeded clean split of ``data``'s training set (uint8 images, labels):
    the defenders' data of every localizer and repair. ``images`` keeps a seeded subset of that
    many of them (a profile's ``[bench] clean_images``), in index order."""
    idx = clean_split(len(data.train_y), fraction, seed)
    if images is not None:
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:images]].sort().values
    return data.train_x[idx], data.train_y[idx]


# ------------------------------------------------------------------ the build's subsets


def seeded_subset(x: torch.Tensor, y: torch.Tensor, k: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of ``k`` images in index order (all images when k is None or too large)."""
    if k is None or k >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return x[idx], y[idx]


def training_subset(data: ImageData, k: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images a build with ``seed`` uses (a profile's ``train_subset``)."""
    return seeded_subset(data.train_x, data.train_y, k, seed)


def evaluation_subset(data: ImageData, k: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images a build with ``seed`` measures its labels on (a profile's ``test_subset``;
    the label records ``k`` as ``extra["test_images"]`` and ``seed``), so the harness and
    ``bd4nn verify`` re-measure on the very same images."""
    return seeded_subset(data.test_x, data.test_y, k, seed + 1)
