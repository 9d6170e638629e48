"""CIFAR-10 for normnets: find it, decode it once, and serve it as fastai `DataLoaders`.

Sections follow the data: where the images come from, decoding and checking
them (once: the uint8 arrays are cached under `data/`), the batch transforms,
and the `DataLoaders`.

Training batches are sliced straight out of one uint8 tensor and augmented as
whole batches, so an epoch does no per-image Python work: on 2 CPU cores the
usual per-image PIL pipeline costs more than the tiny network itself. The
same `DataLoaders` still take image files the fastai way (`learn.predict(path)`,
`dls.test_dl(files)`), item by item through `ToTensorImage`.
"""
import contextlib, hashlib, io, os, sys, tarfile, tempfile, warnings, zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
# fastai 2.8's layers call torch.jit.script on import, which torch 2.10+ warns of at every start of every
# command: a warning for fastai's maintainers, not for our users. This is the first module to import fastai.
warnings.filterwarnings('ignore', r'`torch\.jit\.script` is deprecated', FutureWarning)
from fastai.data.core import Datasets, DataLoaders, TfmdDL  # noqa: E402
from fastai.data.transforms import AttrGetter, Categorize, IntToFloatTensor, Normalize  # noqa: E402
from fastai.torch_core import TensorImage, TensorCategory, default_device  # noqa: E402
from fasttransform import Transform, DisplayedTransform  # noqa: E402
from fastprogress.fastprogress import progress_bar  # noqa: E402

from normnets_files import readable_mode  # noqa: E402

__all__ = ['REPO_DIR', 'DATA_DIR', 'CIFAR10_CLASSES', 'CIFAR10_COUNTS', 'CifarDataError', 'Cifar',
           'Sample', 'find_data', 'load_cifar', 'ToTensorImage', 'to_rgb8', 'crop_flip', 'RandomCropFlip',
           'cutout_mask', 'Cutout', 'ArrayDL', 'plain_train_dl', 'get_dls']

REPO_DIR = Path(__file__).resolve().parent
DATA_DIR = REPO_DIR / 'data'
CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
CIFAR10_COUNTS = {'train': 5000, 'test': 1000}   # images per class folder in the real dataset
# Sources we can name by their md5; the offline copy differs from the official PNGs (see README).
KNOWN_DATA = {
    'b4275aaa92a8d48022b289e647203665': 'CIFAR-10, offline JPEG copy (quality 75) of the official release'
}
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
LAYOUT = ("fastai's URLs.CIFAR layout: train/<class>/*.png|jpg and test/<class>/*.png|jpg for the 10 "
          "CIFAR-10 classes")


class CifarDataError(ValueError):
    "The data is missing, is not CIFAR-10 in fastai's layout, or cannot be read."


# ---------------------------------------------------------------- where the data comes from

def find_data(data=None) -> Path:
    """The CIFAR-10 source: `data` if given, else $NORMNETS_DATA, else `data/cifar10` in the repo,
    else fastai's `untar_data(URLs.CIFAR)` downloads the official release into `data/`."""
    if data is not None and not str(data).strip():   # an unset shell variable, say: not the default
        raise CifarDataError("--data is empty: give a folder or .tgz of CIFAR-10, or leave the option out")
    data = data or os.environ.get('NORMNETS_DATA')
    if data:
        path = Path(data).expanduser()
        if not path.exists():
            raise CifarDataError(
                f"CIFAR-10 data not found at {path}: expected a folder in {LAYOUT}, or a .tgz of one"
            )
        return path
    if (DATA_DIR / 'cifar10').exists(): return DATA_DIR / 'cifar10'
    from fastai.data.external import untar_data, URLs
    try: return untar_data(URLs.CIFAR, archive=DATA_DIR, data=DATA_DIR)
    except Exception as e:
        raise CifarDataError(
            f"no CIFAR-10 given and the download of {URLs.CIFAR} failed ({e}): pass a folder or "
            f".tgz in {LAYOUT} as --data / data=, or set NORMNETS_DATA"
        ) from e


def _is_archive(path: Path) -> bool: return path.is_file() and path.name.endswith(('.tgz', '.tar.gz', '.tar'))


def fingerprint(path: Path) -> str:
    "md5 of the archive's bytes, or of a folder's image paths and bytes: names the exact data a result used."
    md5 = hashlib.md5()
    if path.is_file():
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''): md5.update(chunk)
    else:
        for p in sorted(p for p in path.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES):
            md5.update(str(p.relative_to(path)).encode()); md5.update(p.read_bytes())
    return md5.hexdigest()


# ---------------------------------------------------------------- decoding and checking, once

def _image_files(path: Path):
    "Yield (split, class, name, bytes) for every image under `path`, a folder or an archive."
    if _is_archive(path):
        try:
            with tarfile.open(path) as tar:
                for m in tar:
                    parts = m.name.split('/')
                    if m.isfile() and len(parts) >= 3 and parts[-1].lower().endswith(IMAGE_SUFFIXES):
                        yield parts[-3], parts[-2], parts[-1], tar.extractfile(m).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:   # zlib: a damaged .tgz
            raise CifarDataError(
                f"{path} is not a readable tar archive ({e}): expected a .tgz in {LAYOUT}"
            ) from e
    elif path.is_dir():
        # Accept the folder itself or its parent (e.g. data/ holding cifar10/).
        root = (
            path
            if (path / 'train').is_dir()
            else next((d for d in path.iterdir() if (d / 'train').is_dir()), path)
        )
        for split in CIFAR10_COUNTS:
            for p in sorted((root / split).glob('*/*')):
                if p.suffix.lower() in IMAGE_SUFFIXES: yield split, p.parent.name, p.name, p.read_bytes()
    else:
        raise CifarDataError(f"{path} is neither a folder nor a .tgz archive: expected {LAYOUT}")


def _decode(data: bytes, where: str) -> np.ndarray:
    try: img = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
    except Exception as e: raise CifarDataError(f"{where}: cannot decode the image ({e})") from e
    if img.shape != (32, 32, 3):
        raise CifarDataError(f"{where}: image is {img.shape[1]}x{img.shape[0]}, expected 32x32")
    return img


def decoding_progress(items: list):
    """`items`, with fastprogress's bar on a terminal; elsewhere (a log file) a line at each quarter, not the
    bar's redraws, which a file keeps as one long line."""
    if sys.stdout.isatty(): yield from progress_bar(items); return
    quarter = max(1, len(items) // 4)
    for i, item in enumerate(items, 1):
        yield item
        if i % quarter == 0 or i == len(items): print(f"decoded {i:,} of {len(items):,} images", flush=True)


def _read(path: Path, counts: dict) -> dict:
    "Decode and check every image; return uint8 arrays (N,32,32,3) and int64 labels per split."
    found = {split: {} for split in counts}
    print(f"Decoding {path} (once: the arrays are cached for later runs)", flush=True)
    for split, cls, name, data in decoding_progress(list(_image_files(path))):
        if split in found:
            found[split].setdefault(cls, []).append((name, _decode(data, f"{path}: {split}/{cls}/{name}")))
    arrays = {}
    for split, per_class in found.items():
        if sorted(per_class) != CIFAR10_CLASSES:
            raise CifarDataError(
                f"{path}: {split}/ holds class folders {sorted(per_class) or 'none'}, expected the "
                f"10 CIFAR-10 classes {CIFAR10_CLASSES} ({LAYOUT})"
            )
        for cls, imgs in per_class.items():
            if len(imgs) != counts[split]:
                raise CifarDataError(
                    f"{path}: {split}/{cls} has {len(imgs)} images, expected {counts[split]}"
                )
        ordered = [
            (CIFAR10_CLASSES.index(c), img)
            for c in CIFAR10_CLASSES
            for _, img in sorted(per_class[c], key=lambda o: o[0])
        ]
        arrays[f'x_{split}'] = np.stack([img for _, img in ordered])
        arrays[f'y_{split}'] = np.array([lbl for lbl, _ in ordered], dtype=np.int64)
    return arrays


class Cifar:
    "Decoded CIFAR-10: uint8 images (N,32,32,3) and labels for train and test, and where they came from."
    def __init__(self, arrays: dict, source: Path, fingerprint: str):
        self.x_train, self.y_train, self.x_test, self.y_test = (
            arrays[k] for k in ('x_train', 'y_train', 'x_test', 'y_test')
        )
        self.source, self.fingerprint, self.classes = str(source), fingerprint, CIFAR10_CLASSES

    def describe(self) -> dict:
        "What a result must say about its data."
        return dict(
            data=KNOWN_DATA.get(self.fingerprint, 'CIFAR-10'),
            data_source=self.source,
            data_md5=self.fingerprint,
        )


def _write_cache(cache: Path, arrays: dict):
    """Write to a temporary name and rename, so an interrupted run leaves no half-written cache; readable by
    whoever the umask lets read new files (a shared lab machine's other users)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix='.npz.tmp')
    try:
        with os.fdopen(fd, 'wb') as f: np.savez(f, **arrays)
        readable_mode(tmp, 0o666)
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp): os.remove(tmp)


def load_cifar(data=None, counts: dict = CIFAR10_COUNTS, cache_dir: Path = DATA_DIR / 'cache') -> Cifar:
    """Decode CIFAR-10 from `data` (see `find_data`), checking its layout and per-class counts.
    The decoded arrays are cached by the source's fingerprint, so later starts skip the decoding."""
    path = find_data(data)
    fp = fingerprint(path)
    cache = Path(cache_dir) / f'cifar10-{fp}.npz'
    if cache.exists():
        try:
            with np.load(cache) as z: return Cifar(dict(z), path, fp)
        except Exception as e:   # a damaged cache is rebuilt, never trusted; another user's may be unreadable
            with contextlib.suppress(OSError): cache.unlink()
            if cache.exists(): warnings.warn(f"cannot read the decoded cache {cache} ({e}): decoding anew")
    arrays = _read(path, counts)
    try: _write_cache(cache, arrays)
    except OSError as e: warnings.warn(f"cannot write the decoded cache {cache} ({e}): it is not cached")
    return Cifar(arrays, path, fp)


# ---------------------------------------------------------------- transforms

class Sample:
    "An item of the `Datasets`: one decoded (32,32,3) uint8 image and its class name."
    __slots__ = ('image', 'label')
    def __init__(self, image, label): self.image, self.label = image, label


class ToTensorImage(Transform):
    """An item -> uint8 (3,32,32) `TensorImage`: a decoded `Sample`, or an image file, PIL image or array from
    a user."""
    input_types = (Sample, str, Path, Image.Image, np.ndarray)   # what `test_dl`/`predict` may be given
    # One `encodes` per input type: fastcore dispatches on the annotation (hence the noqa).
    def encodes(self, o: Sample): return self._from_array(o.image)
    def encodes(self, o: np.ndarray): return self._from_array(o)   # noqa: F811
    def encodes(self, o: str | Path | Image.Image):   # noqa: F811
        # PIL directly: fastai's PILImage.create converts to RGB on opening, which clips 16-bit images.
        img = to_rgb8(o if isinstance(o, Image.Image) else Image.open(o))
        if img.size != (32, 32): img = img.resize((32, 32), Image.BILINEAR)
        return self._from_array(np.asarray(img))
    @staticmethod
    def _from_array(a): return TensorImage(torch.from_numpy(np.array(a)).permute(2, 0, 1))   # a writable copy


def to_rgb8(img: Image.Image) -> Image.Image:
    """An image as 8-bit RGB, the network's input. PIL's own `convert('RGB')` clips 16-bit images (grayscale
    PNGs of mode I;16 or I) at 255, which turns them white: they are scaled from 0-65535 to 0-255 instead.
    Float and 32-bit images have no range PIL can tell, so they are refused."""
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N') or (
        img.mode == 'I' and np.asarray(img).max() <= 65535
    ):
        wide = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.round(wide * (255 / 65535)).astype(np.uint8)).convert('RGB')
    if img.mode in ('I', 'F'):
        raise ValueError(
            f"cannot read a {img.mode}-mode image (32-bit integer or float): give 8- or 16-bit images"
        )
    return img.convert('RGB')


def crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int
) -> torch.Tensor:
    """Crop each image of the batch `x` (N, C, H, W) at offsets (`dy`, `dx`) of its `pad`-padded copy, and
    mirror those where `flip` is true. One gather with computed indices: no data-dependent shapes, so on a GPU
    it never waits for the device (boolean-mask indexing does, once per mask)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)                       # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)
    # (N, W), mirrored where flipped
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class RandomCropFlip(DisplayedTransform):
    """Random crop with `pad` pixels of zero padding and a random horizontal flip, on a whole uint8 batch at
    once. With a `seed`, drawn from a generator of its own: the crops and flips of a run are then the same
    whatever else draws random numbers, such as the other runs trained beside it (normnets_fused)."""
    split_idx, order = 0, 5   # training only; before IntToFloatTensor, so it moves bytes, not floats
    def __init__(self, pad: int = 4, seed: int | None = None):
        self.pad, self.seed, self._rng = pad, seed, None

    def generator(self, device) -> torch.Generator | None:
        if self.seed is None: return None
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device).manual_seed(self.seed)
        return self._rng

    def encodes(self, x: TensorImage):
        n, dev = len(x), x.device
        rng = self.generator(dev)
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2, n), device=dev, generator=rng)
        flip = torch.rand(n, device=dev, generator=rng) < 0.5
        # Plain tensors inside: each op on a TensorImage passes through fastai's Python __torch_function__.
        return TensorImage(crop_flip(x.as_subclass(torch.Tensor), dy, dx, flip, self.pad))

    def __getstate__(self):   # an exported learner carries the transform, not its generator (not picklable)
        return {**self.__dict__, '_rng': None}


def cutout_mask(h: int, w: int, size: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks, true in the `size` x `size` square centred at (`cy`, `cx`) of each image, cut off
    where it reaches past the border. Comparisons with computed bounds: no host sync on a GPU."""
    lo_y, lo_x = (cy - size // 2)[:, None], (cx - size // 2)[:, None]
    rows, cols = torch.arange(h, device=cy.device)[None], torch.arange(w, device=cx.device)[None]
    inside_rows = (rows >= lo_y) & (rows < lo_y + size)   # (N, H)
    inside_cols = (cols >= lo_x) & (cols < lo_x + size)   # (N, W)
    return inside_rows[:, :, None] & inside_cols[:, None, :]


class Cutout(DisplayedTransform):
    """Cutout (DeVries & Taylor 2017): a random `size` x `size` square of each training image set to 0, which
    after normalization is the training images' mean. The network must then recognize objects from part of
    them."""
    split_idx, order = 0, 100   # training only; after Normalize (99), so 0 is the mean
    def __init__(self, size: int): self.size = size

    def encodes(self, x: TensorImage):
        n, _, h, w = x.shape
        cy, cx = torch.randint(0, h, (n,), device=x.device), torch.randint(0, w, (n,), device=x.device)
        mask = cutout_mask(h, w, self.size, cy, cx)
        return TensorImage(x.as_subclass(torch.Tensor).masked_fill(mask[:, None], 0))


# ---------------------------------------------------------------- DataLoaders

class ArrayDL(TfmdDL):
    """A `TfmdDL` that slices batches out of in-memory uint8 `images` and `labels` when it has them
    (training and validation), and falls back to fastai's item-by-item path when it does not
    (`test_dl` of image files, and exported learners, which carry no data)."""
    def __init__(self, dataset=None, images=None, labels=None, **kwargs):
        self.images, self.labels = images, labels
        super().__init__(dataset, **kwargs)

    def create_batches(self, samps):
        if self.images is None: yield from super().create_batches(samps); return
        idxs = torch.as_tensor(list(samps), device=self.images.device)
        for b in idxs.split(self.bs):
            if self.drop_last and len(b) < self.bs: break
            yield TensorImage(self.images[b]), TensorCategory(self.labels[b])

    def to(self, device):
        "Move the loader, its transforms and its in-memory images and labels to `device`."
        super().to(device)
        if self.images is not None: self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def new(self, dataset=None, cls=None, **kwargs):
        # Same data (e.g. `get_preds` re-batching the validation set): keep the fast path.
        if dataset is None or dataset is self.dataset:
            kwargs = {"images": self.images, "labels": self.labels, **kwargs}
        return super().new(dataset, cls, **kwargs)


def plain_train_dl(dls: DataLoaders) -> ArrayDL:
    """The training images in order and without augmentation (the test set's pipeline): to measure training
    accuracy."""
    return dls.valid.new(images=dls.train.images, labels=dls.train.labels, n=len(dls.train.images))


def _subset(x, y, n, seed):
    "A random `n` of (x, y), the same for the same seed; all of it when n is None."
    if n is None or n >= len(x): return x, y
    idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
    return x[idx], y[idx]


def _holdout(x, y, n):
    """The training images split at random into (kept, held out `n`): the same split every time, whatever the
    seed."""
    idx = np.random.default_rng(0).permutation(len(x))
    kept, held = np.sort(idx[n:]), np.sort(idx[:n])
    return x[kept], y[kept], x[held], y[held]


def get_dls(data=None, bs: int = 256, n_train: int = None, n_test: int = None, seed: int = 0, device=None,
            counts: dict = CIFAR10_COUNTS, cifar: Cifar = None, holdout: int = 0, crop_pad: int = 4,
            cutout: int = 0) -> DataLoaders:
    """fastai `DataLoaders` of CIFAR-10: the training images (augmented) for training and the test images for
    validation, in batches of `bs` (by default the recipes' default, `Recipe.bs`). `n_train`/`n_test` take a
    random subset (for quick checks); `cifar` reuses decoded data.
    `holdout` > 0 validates on that many training images set aside instead (a recipe search: the test set
    stays unseen), and trains on the others. The training batches are randomly cropped from a copy padded by
    `crop_pad` pixels (0: not cropped) and flipped; `cutout` > 0 adds `Cutout` of that size."""
    cifar = cifar or load_cifar(data, counts)
    x_train, y_train, x_test, y_test = cifar.x_train, cifar.y_train, cifar.x_test, cifar.y_test
    if holdout: x_train, y_train, x_test, y_test = _holdout(x_train, y_train, holdout)
    x_train, y_train = _subset(x_train, y_train, n_train, seed)
    x_test, y_test = _subset(x_test, y_test, n_test, seed)
    device = default_device() if device is None else torch.device(device)

    # Normalize with the training images' channel statistics.
    std, mean = torch.std_mean(torch.from_numpy(x_train).reshape(-1, 3).float() / 255, dim=0)
    batch_tfms = [
        RandomCropFlip(crop_pad, seed),
        IntToFloatTensor(),
        Normalize.from_stats(mean.tolist(), std.tolist(), cuda=False),
        *([Cutout(cutout)] if cutout else []),
    ]
    item_tfms = [[ToTensorImage()], [AttrGetter('label'), Categorize(vocab=cifar.classes, sort=False)]]

    def dl(x, y, split_idx, **kwargs):
        # fastai's item pipeline (`show`, `test_dl`, `Interpretation`) sees (image, class name) `Sample`s;
        # batches come from the tensors. One Datasets per split, not one split Datasets: an exported learner
        # then carries no list of 60,000 split indices.
        dset = Datasets(
            [Sample(img, cifar.classes[l]) for img, l in zip(x, y)], item_tfms, split_idx=split_idx
        )
        images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
        return ArrayDL(dset, images=images, labels=torch.from_numpy(y).to(device), after_batch=batch_tfms,
                       num_workers=0, device=device, **kwargs)
    # Evaluation keeps no activations for a backward pass, so it takes big batches whatever the training batch
    # size (the batch-size study trains with 4 images a batch; batch norm evaluates with its running
    # statistics).
    valid_bs = max(2 * bs, 512)
    dls = DataLoaders(
        dl(x_train, y_train, 0, bs=bs, shuffle=True, drop_last=True),
        dl(x_test, y_test, 1, bs=valid_bs),
        device=device,
    )
    dls.cifar = cifar
    return dls
