"""Datasets for training, held in memory.

`load_dataset(spec, resolution=None)` returns a `Dataset`: images (N, C, H, W)
stored as uint8 (or float for data that is already scaled), handed out as
float32 in [-1, 1]; vector data (N, D) as float32. Sources:

    digits            sklearn.datasets.load_digits: 1797 real 8x8 greyscale digits (the default)
    gmm               8192 samples of an 8-component ring in 2-D (fastdiff.diffusion.gmm)
    DIR or FILE.zip   a folder / zip of PNG/JPEG/... images, all of one size
    FILE.npz          an array: uint8 images (N, H, W[, C]) / (N, C, H, W), or float data in [-1, 1]
    CIFAR DIR         a CIFAR-10 python-format directory (data_batch_1 ... data_batch_5)

Class labels (`Dataset.labels`, int64 (N,), or None; `Dataset.classes` their names):
the digits' and CIFAR-10's own; an image folder or zip takes a file's class from its
first-level sub-folder (classes numbered in sorted name order, as EDM's dataset tool
does for ImageNet's folders; files at the top level give no labels); an .npz from an
integer `labels` array beside the data.

`Sampler` hands out mini-batch indices in epoch order (a fresh permutation per
epoch) and the STF reference rows uniformly with replacement, from one
torch.Generator whose state, with the position in the epoch, is checkpointed.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """The data cannot be used; the message names the source and the problem."""


class Dataset:
    def __init__(self, data: torch.Tensor, name: str, xflip: bool = False, labels: torch.Tensor | None = None,
                 classes: list | None = None, no_labels: str | None = None):
        self.data = data          # uint8 images, or float32 already in [-1, 1]
        self.name = name
        self.xflip = xflip
        self.labels = labels      # int64 (N,) class of each row, or None
        self.classes = classes if classes is not None or labels is None else \
            [str(c) for c in range(int(labels.max()) + 1)]
        self.no_labels = no_labels  # why labels is None, where the data had some that could not be used

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.labels is not None else 0

    def require_labels(self) -> torch.Tensor:
        """The labels, or a DataError saying why there are none and how to supply them."""
        if self.labels is None:
            raise DataError(self.no_labels or f"--data {self.name} has no class labels (an image folder takes "
                                              f"them from class sub-folders, an .npz from a 'labels' array)")
        return self.labels

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.data.ndim == 4

    def __len__(self) -> int:
        return self.data.shape[0]

    def to(self, device) -> "Dataset":
        return Dataset(self.data.to(device), self.name, self.xflip,
                       None if self.labels is None else self.labels.to(device), self.classes, self.no_labels)

    def get(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """Rows idx as float32 in [-1, 1]; flip (bool per row) mirrors images left-right."""
        x = self.data[idx]
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        if flip is not None and self.is_image:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


class Sampler:
    """Mini-batch and reference-row indices, reproducible and resumable.

    Under DDP every rank holds the same generator; rank r takes rows
    r::world of each global batch, so ranks see disjoint samples, and each rank
    draws its own reference rows from a rank-offset stream.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1, xflip: bool = False):
        self.n, self.batch, self.rank, self.world, self.xflip = n, batch, rank, world, xflip
        self.gen = torch.Generator().manual_seed(seed)
        self.ref_gen = torch.Generator().manual_seed(seed + 1_000_003 * (rank + 1))
        self.epoch, self.pos = 0, 0
        self.perm = torch.randperm(n, generator=self.gen)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(indices, flips) of this rank's next mini-batch."""
        need = self.batch * self.world
        parts = []
        while need > 0:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.perm = torch.randperm(self.n, generator=self.gen)
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        idx = torch.cat(parts)[self.rank::self.world]
        flip = torch.rand(self.batch * self.world, generator=self.gen)[self.rank::self.world] < 0.5 \
            if self.xflip else None
        return idx, flip

    def ref_rows(self, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """m uniform draws with replacement (and their flips: the same augmentation as the batch)."""
        idx = torch.randint(self.n, (m,), generator=self.ref_gen)
        flip = torch.rand(m, generator=self.ref_gen) < 0.5 if self.xflip else None
        return idx, flip

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "ref_gen": self.ref_gen.get_state(), "epoch": self.epoch,
                "pos": self.pos, "perm": self.perm.clone(), "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise DataError(f"the checkpoint's data sampler covers {state['n']} samples; the data has {self.n}")
        self.gen.set_state(state["gen"])
        self.ref_gen.set_state(state["ref_gen"])
        self.epoch, self.pos, self.perm = state["epoch"], state["pos"], state["perm"].clone()


# ----------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------

def _resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Resize uint8 or float (N, C, H, W) images to resolution x resolution (antialiased bilinear)."""
    if resolution is None or (x.shape[-2] == resolution and x.shape[-1] == resolution):
        return x
    is_u8 = x.dtype == torch.uint8
    y = F.interpolate(x.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                      align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8) if is_u8 else y


def _load_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = d.images.astype(np.float32)                              # (1797, 8, 8), values 0..16
    return torch.from_numpy(x / 8.0 - 1.0)[:, None], torch.from_numpy(d.target).long(), [str(c) for c in range(10)]


def _load_gmm() -> torch.Tensor:
    try:
        from fastdiff.diffusion import gmm
    except ImportError as e:
        raise DataError(f"--data gmm needs fastdiff.diffusion.gmm, which is not available: {e}") from None
    mix = gmm.GaussianMixture.ring(n_components=8, radius=1.0, std=0.05, dim=2)
    x, k = mix.sample(8192, generator=torch.Generator().manual_seed(0), return_components=True)
    return x.float(), k.long(), [str(c) for c in range(8)]    # the class: the mixture component


def _decode_images(items, source: str) -> torch.Tensor:
    from PIL import Image
    arrays, first = [], None
    for name, read in items:
        try:
            with Image.open(io.BytesIO(read())) as im:
                im.load()
                mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                arr = np.asarray(im.convert(mode))
        except Exception as e:
            raise DataError(f"--data {source}: cannot read image {name!r}: {e}") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if first is None:
            first = (name, arr.shape)
        elif arr.shape[:2] != first[1][:2]:
            raise DataError(f"--data {source}: images of mixed sizes: {first[0]!r} is "
                            f"{first[1][1]}x{first[1][0]}, {name!r} is {arr.shape[1]}x{arr.shape[0]}; "
                            f"resize them to one size first")
        arrays.append(arr)
    if not arrays:
        raise DataError(f"--data {source}: no images found (looked for {', '.join(IMAGE_EXTS)})")
    channels = max(a.shape[2] for a in arrays)
    arrays = [np.repeat(a, channels, axis=2) if a.shape[2] != channels else a for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _folder_labels(names: list, source: str):
    """(labels, classes) from each file's first-level sub-folder, or (None, None) when every file is at
    the top level; a mix of both cannot be labelled."""
    parts = [n.replace(os.sep, "/").split("/") for n in names]
    top = [n for n, p in zip(names, parts) if len(p) == 1]
    if len(top) == len(names):
        return None, None
    if top:
        return None, f"--data {source}: {top[0]!r} lies outside any class sub-folder"
    classes = sorted({p[0] for p in parts})
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[p[0]] for p in parts], dtype=torch.long), classes


def _load_folder(path: str):
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
    files.sort()

    def reader(f):
        def read():
            with open(f, "rb") as fh:
                return fh.read()
        return read
    names = [os.path.relpath(f, path) for f in files]
    return (_decode_images(((n, reader(f)) for n, f in zip(names, files)), path), *_folder_labels(names, path))


def _load_zip(path: str) -> torch.Tensor:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"--data {path}: not a readable zip file: {e}") from None
    with zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTS))
        return _decode_images(((n, (lambda n=n: zf.read(n))) for n in names), path), *_folder_labels(names, path)


def _npz_labels(z, key: str, n: int, path: str):
    if "labels" not in z or key == "labels":
        return None, None
    lab = z["labels"]
    if lab.ndim != 1 or len(lab) != n or lab.dtype.kind not in "iu" or (len(lab) and lab.min() < 0):
        return None, (f"--data {path}: 'labels' must be {n} non-negative integers (one per row of {key!r}), "
                      f"got shape {lab.shape} dtype {lab.dtype}")
    return torch.from_numpy(lab.astype(np.int64)), None


def _load_npz(path: str):
    try:
        with np.load(path) as z:
            keys = list(z.keys())
            key = next((k for k in ("x", "images", "data", "arr_0") if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None and len(keys) == 2 and "labels" in keys:
                key = next(k for k in keys if k != "labels")
            if key is None:
                raise DataError(f"--data {path}: cannot tell which array holds the data among {keys}; "
                                f"name it 'x'")
            arr = z[key]
            labels, classes = _npz_labels(z, key, arr.shape[0] if arr.ndim else 0, path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"--data {path}: not a readable .npz file: {e}") from None
    if arr.ndim not in (2, 3, 4) or arr.shape[0] == 0:
        raise DataError(f"--data {path}: array {key!r} has shape {arr.shape}; expected (N, D) vectors or "
                        f"(N, H, W[, C]) / (N, C, H, W) images")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"--data {path}: array {key!r} has dtype {arr.dtype}; expected numbers (uint8 images or "
                        f"float data)")
    if arr.ndim == 2:
        with np.errstate(over="ignore", invalid="ignore"):       # out of float32's range: Inf, refused below
            x = torch.from_numpy(arr.astype(np.float32))
        return _checked_float(x, path), labels, classes
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)                           # NHWC -> NCHW
    x = torch.from_numpy(np.ascontiguousarray(arr))
    return (x if x.dtype == torch.uint8 else _checked_float(x.float(), path)), labels, classes


# The largest row norm accepted: squared norms (and the distances STF takes between rows)
# stay far inside float32's range (3.4e38) even when divided by sigma^2 = 0.002^2.
MAX_ROW_NORM = 1e15


def _checked_float(x: torch.Tensor, path: str) -> torch.Tensor:
    """x (float32) if every value is finite (after the cast: beyond float32's range is Inf) and
    no row is so large that float32 training overflows; a DataError naming the cause otherwise."""
    bad = ~torch.isfinite(x)
    if bad.any():
        row = int(bad.reshape(len(x), -1).any(1).nonzero()[0])
        raise DataError(f"--data {path}: the array holds NaN or Inf (or values beyond float32's range), "
                        f"first in row {row}")
    norms = x.double().reshape(len(x), -1).norm(dim=1)
    if len(x) and norms.max() > MAX_ROW_NORM:
        row = int(norms.argmax())
        raise DataError(f"--data {path}: row {row} has norm {float(norms[row]):.3g}; float32 training overflows "
                        f"for data this large: standardize it (about unit standard deviation) and set "
                        f"--sigma-data to its standard deviation")
    return x


def _numpy_internal(name: str):
    """numpy's pickle helpers live in numpy._core since numpy 2 (numpy.core before)."""
    import importlib
    mod, attr = name.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(mod.replace("numpy.", "numpy._core.", 1)), attr)
    except (ImportError, AttributeError):
        return getattr(importlib.import_module(mod.replace("numpy.", "numpy.core.", 1)), attr)


def _latin1_encode(text, encoding="latin1"):
    # Python 3 writes bytes at pickle protocol 2 as _codecs.encode(str, "latin1"); no other codec is needed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


class _DataUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, str, bytes, numbers and numpy arrays.

    pickle.load calls whatever callable a file names (a crafted data_batch_1 can run any code
    while it is read); this unpickler resolves no global outside the allow-list below, so a file
    that needs one is refused before anything of it is called."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, and a data file may hold only dicts, lists, "
                                         f"str, bytes, numbers and numpy arrays (loading it could run code)")
        if module == "_codecs":
            return _latin1_encode
        if module == "numpy":
            return getattr(np, name)
        return _numpy_internal(f"numpy.{module.split('.', 2)[-1]}.{name}")


def read_data_pickle(path: str, source: str):
    """The object in a pickled data file (a CIFAR batch), through _DataUnpickler; a DataError naming
    source and file otherwise (code-bearing, damaged or unreadable)."""
    try:
        with open(path, "rb") as fh:
            return _DataUnpickler(fh, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{source}: refusing {path!r}: {e}" if isinstance(e, pickle.UnpicklingError)
                        else f"{source}: cannot read {path!r}: {e}") from None


def _cifar_dir(path: str) -> str | None:
    for d in (path, os.path.join(path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, "data_batch_1")):
            return d
    return None


def _load_cifar(path: str):
    chunks, labels = [], []
    for i in range(1, 6):
        f = os.path.join(path, f"data_batch_{i}")
        if not os.path.exists(f):
            if i == 1:
                raise DataError(f"--data {path}: data_batch_1 missing")
            break
        batch = read_data_pickle(f, f"--data {path}")
        try:
            chunks.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch.get(b"labels", []), dtype=np.int64))
        except Exception as e:
            raise DataError(f"--data {path}: cannot read CIFAR-10 batch {f!r}: {e}") from None
    x, y = torch.from_numpy(np.concatenate(chunks)), torch.from_numpy(np.concatenate(labels))
    return x, (y if len(y) == len(x) else None), None


def load_dataset(spec: str, resolution: int | None = None, xflip: bool = False) -> Dataset:
    """Load the data named by spec (see the module docstring); raise DataError naming the problem."""
    if spec == "digits":
        x, labels, classes = _load_digits()
    elif spec == "gmm":
        x, labels, classes = _load_gmm()
    elif not os.path.exists(spec):
        raise DataError(f"--data {spec!r}: no such file or directory (or use 'digits' or 'gmm')")
    elif os.path.isdir(spec):
        cifar = _cifar_dir(spec)
        x, labels, classes = _load_cifar(cifar) if cifar else _load_folder(spec)
    elif spec.lower().endswith(".zip"):
        x, labels, classes = _load_zip(spec)
    elif spec.lower().endswith(".npz"):
        x, labels, classes = _load_npz(spec)
    else:
        raise DataError(f"--data {spec!r}: unsupported file type (expected a folder, .zip or .npz)")
    if x.ndim == 4:
        try:
            x = _resize(x, resolution)
        except RuntimeError as e:            # the allocator's "can't allocate memory": a typo'd resolution
            if "alloc" not in str(e):
                raise
            raise DataError(f"--resolution {resolution}: {len(x)} images of {resolution}x{resolution} need "
                            f"{len(x) * x.shape[1] * resolution ** 2 * 4 / 1e9:.3g} GB while resizing, more "
                            f"than this machine could allocate") from None
    elif resolution is not None:
        raise DataError(f"--resolution {resolution} given but --data {spec} is vector data of shape {tuple(x.shape[1:])}")
    if len(x) == 0:
        raise DataError(f"--data {spec}: the data set is empty")
    # Labels that cannot be read (a loader's message in place of the class names) are an
    # error only where they are needed (Dataset.require_labels).
    why = classes if isinstance(classes, str) else None
    return Dataset(x, spec, xflip=xflip and x.ndim == 4, labels=labels, classes=None if why else classes,
                   no_labels=why)


__all__ = ["Dataset", "DataError", "Sampler", "load_dataset"]
