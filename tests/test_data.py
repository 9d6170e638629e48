"The data path: tiny archives and folders built here, their errors, the cache, the batch augmentation."
import io, os, stat, tarfile, tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normnets_data import (CIFAR10_CLASSES, CifarDataError, Cutout, RandomCropFlip, ToTensorImage, crop_flip,
                           cutout_mask, get_dls, load_cifar)
from fastai.torch_core import TensorImage

COUNTS = {'train': 4, 'test': 2}


def tiny_images(seed=0, counts=COUNTS, size=32):
    "(path inside the archive, PNG bytes, pixels) for a tiny CIFAR-like set."
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for cls in CIFAR10_CLASSES:
            for i in range(n):
                px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                buf = io.BytesIO(); Image.fromarray(px).save(buf, format='PNG')
                yield f'cifar10/{split}/{cls}/{i:04d}.png', buf.getvalue(), px


def make_archive(path, images):
    with tarfile.open(path, 'w:gz') as tar:
        for name, data, _ in images:
            info = tarfile.TarInfo(name); info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def tiny_tgz(tmp_path): return make_archive(tmp_path / 'tiny.tgz', tiny_images())


def test_archive_loads_in_class_order_and_caches(tiny_tgz, tmp_path):
    cache = tmp_path / 'cache'
    c = load_cifar(tiny_tgz, COUNTS, cache_dir=cache)
    assert c.x_train.shape == (40, 32, 32, 3) and c.x_test.shape == (20, 32, 32, 3)
    assert c.y_train.tolist() == [i for i in range(10) for _ in range(4)]
    pixels = {name: px for name, _, px in tiny_images()}
    np.testing.assert_array_equal(c.x_test[3], pixels['cifar10/test/automobile/0001.png'])
    assert [p.name for p in cache.iterdir()] == [f'cifar10-{c.fingerprint}.npz']   # no temporary file left
    again = load_cifar(tiny_tgz, COUNTS, cache_dir=cache)
    np.testing.assert_array_equal(again.x_train, c.x_train)


def test_folder_source_gives_the_same_arrays(tiny_tgz, tmp_path):
    with tarfile.open(tiny_tgz) as tar: tar.extractall(tmp_path / 'folder')
    a = load_cifar(tiny_tgz, COUNTS, cache_dir=tmp_path / 'c1')
    # the parent of cifar10/ works too
    b = load_cifar(tmp_path / 'folder', COUNTS, cache_dir=tmp_path / 'c2')
    np.testing.assert_array_equal(a.x_train, b.x_train); np.testing.assert_array_equal(a.y_test, b.y_test)


def test_environment_variable_names_the_source(tiny_tgz, tmp_path, monkeypatch):
    monkeypatch.setenv('NORMNETS_DATA', str(tiny_tgz))
    assert load_cifar(counts=COUNTS, cache_dir=tmp_path / 'c').source == str(tiny_tgz)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CifarDataError, match='not found at .*nowhere.tgz.*URLs.CIFAR layout'):
        load_cifar(tmp_path / 'nowhere.tgz', COUNTS, cache_dir=tmp_path / 'c')


def test_file_that_is_not_an_archive(tmp_path):
    bad = tmp_path / 'bad.tgz'; bad.write_bytes(b'this is not a tar file at all')
    with pytest.raises(CifarDataError, match='bad.tgz is not a readable tar archive'):
        load_cifar(bad, COUNTS, cache_dir=tmp_path / 'c')


def test_archive_without_the_cifar_layout(tmp_path):
    imgs = [(n.replace('/train/', '/training/'), d, p) for n, d, p in tiny_images()]
    with pytest.raises(
        CifarDataError, match=r'train/ holds class folders none, expected the 10 CIFAR-10 classes'
    ):
        load_cifar(make_archive(tmp_path / 'x.tgz', imgs), COUNTS, cache_dir=tmp_path / 'c')
    imgs = [(n.replace('/cat/', '/kitten/'), d, p) for n, d, p in tiny_images()]
    with pytest.raises(CifarDataError, match="kitten"):
        load_cifar(make_archive(tmp_path / 'y.tgz', imgs), COUNTS, cache_dir=tmp_path / 'c')


def test_wrong_count_names_the_class_folder(tmp_path):
    imgs = [o for o in tiny_images() if o[0] != 'cifar10/train/dog/0002.png']
    cache = tmp_path / 'c'
    with pytest.raises(CifarDataError, match='train/dog has 3 images, expected 4'):
        load_cifar(make_archive(tmp_path / 'x.tgz', imgs), COUNTS, cache_dir=cache)
    assert not cache.exists() or not any(cache.iterdir())    # nothing half-written


def test_wrong_size_and_undecodable_images(tmp_path):
    imgs = list(tiny_images())
    big = next(tiny_images(size=64))
    with pytest.raises(CifarDataError, match='0000.png: image is 64x64, expected 32x32'):
        load_cifar(make_archive(tmp_path / 'a.tgz', [big] + imgs[1:]), COUNTS, cache_dir=tmp_path / 'c')
    broken = (imgs[0][0], b'\x89PNG garbage', None)
    with pytest.raises(CifarDataError, match='cannot decode'):
        load_cifar(make_archive(tmp_path / 'b.tgz', [broken] + imgs[1:]), COUNTS, cache_dir=tmp_path / 'c')


def test_damaged_cache_is_rebuilt(tiny_tgz, tmp_path):
    cache = tmp_path / 'c'
    c = load_cifar(tiny_tgz, COUNTS, cache_dir=cache)
    (cache / f'cifar10-{c.fingerprint}.npz').write_bytes(b'truncated')
    np.testing.assert_array_equal(load_cifar(tiny_tgz, COUNTS, cache_dir=cache).x_train, c.x_train)


def test_the_cache_is_readable_as_the_umask_says(tiny_tgz, tmp_path):
    umask = os.umask(0o022)
    try: c = load_cifar(tiny_tgz, COUNTS, cache_dir=tmp_path / 'c')
    finally: os.umask(umask)
    assert stat.S_IMODE((tmp_path / 'c' / f'cifar10-{c.fingerprint}.npz').stat().st_mode) == 0o644


def test_a_cache_that_cannot_be_read_or_removed_is_bypassed_with_a_warning(tiny_tgz, tmp_path, monkeypatch):
    """Another user's cache on a shared machine (simulated: the tests may run as root, whom permissions do not
    stop) is neither trusted nor deleted: the data is decoded anew, and a cache folder that cannot be written
    is only a warning."""
    cache = tmp_path / 'c'
    c = load_cifar(tiny_tgz, COUNTS, cache_dir=cache)
    def refused(*args, **kwargs): raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(np, 'load', refused)
    monkeypatch.setattr(Path, 'unlink', refused)
    monkeypatch.setattr(tempfile, 'mkstemp', refused)
    with pytest.warns(UserWarning) as warned: again = load_cifar(tiny_tgz, COUNTS, cache_dir=cache)
    np.testing.assert_array_equal(again.x_train, c.x_train)
    messages = ' '.join(str(w.message) for w in warned)
    assert 'cannot read the decoded cache' in messages and 'cannot write the decoded cache' in messages


def test_dataloaders_batches_and_files(tiny_tgz, tmp_path):
    c = load_cifar(tiny_tgz, COUNTS, cache_dir=tmp_path / 'c')
    dls = get_dls(bs=8, cifar=c, device='cpu')
    assert len(dls.train_ds) == 40 and len(dls.valid_ds) == 20 and dls.vocab == CIFAR10_CLASSES
    x, y = dls.one_batch()
    assert isinstance(x, TensorImage) and x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    # Validation: no augmentation, normalized with the training set's channel statistics.
    xv, yv = next(iter(dls.valid))
    mean = c.x_train.reshape(-1, 3).mean(0) / 255; std = c.x_train.reshape(-1, 3).std(0) / 255
    raw = torch.from_numpy(c.x_test[:8]).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(
        xv[:8],
        (raw - torch.tensor(mean)[:, None, None].float()) / torch.tensor(std)[:, None, None].float(),
        atol=1e-4,
        rtol=1e-4,
    )
    assert yv.tolist() == c.y_test[:len(yv)].tolist()
    # Image files go through the same pipeline (fastai's test_dl), item by item.
    files = []
    for i in range(3):
        files.append(tmp_path / f'img{i}.png'); Image.fromarray(c.x_test[i]).save(files[-1])
    xt, = dls.test_dl(files).one_batch()
    torch.testing.assert_close(xt, xv[:3])


def test_random_crop_flip_is_a_padded_crop_maybe_flipped():
    x = TensorImage(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))
    out = RandomCropFlip(4)(x, split_idx=0)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for i in range(len(x)):
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        plain = any(torch.equal(out[i], c) for c in crops)
        flipped = any(torch.equal(out[i], c.flip(-1)) for c in crops)
        assert plain or flipped
        flips += flipped and not plain
    assert 10 < flips < 54                         # about half are flipped
    assert torch.equal(RandomCropFlip(4)(x, split_idx=1), x)   # not applied to validation


def masked_crop_flip(x, dy, dx, flip, pad):
    """The crop and flip as normnets did them before: one boolean-mask copy per offset (a host sync each on a
    GPU)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = torch.empty(n, c, h, w + 2 * pad, dtype=x.dtype)
    for s in range(2 * pad + 1):
        m = dy == s
        rows[m] = padded[m, :, s:s + h]
    out = torch.empty_like(x)
    for s in range(2 * pad + 1):
        m = dx == s
        out[m] = rows[m, :, :, s:s + w]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def test_gathered_crop_flip_equals_the_masked_one_for_the_same_offsets():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    dy, dx = torch.randint(0, 9, (2, 128), generator=g)
    flip = torch.rand(128, generator=g) < 0.5
    assert torch.equal(crop_flip(x, dy, dx, flip, 4), masked_crop_flip(x, dy, dx, flip, 4))


def test_moving_the_dataloaders_moves_their_images(tiny_tgz, tmp_path):
    """dls.to(device) moves the in-memory images and labels too, not only fastai's transforms (meta: a second
    device)."""
    c = load_cifar(tiny_tgz, COUNTS, cache_dir=tmp_path / 'c')
    dls = get_dls(bs=8, cifar=c, device='cpu')
    dls.to('meta')
    for dl in dls.loaders:
        assert dl.images.device.type == 'meta' and dl.labels.device.type == 'meta'
        assert torch.device(dl.device).type == 'meta'


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grayscale PNG becomes the same picture in 8 bits, not a white square (PIL's convert clips at
    255)."""
    wide = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / 'g16.png')
    assert Image.open(tmp_path / 'g16.png').mode.startswith('I')
    x = ToTensorImage()(tmp_path / 'g16.png')
    expected = torch.from_numpy(np.round(wide / 257).astype(np.uint8))
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[0], expected) and torch.equal(x[1], expected) and x.float().mean() < 200
    Image.fromarray(np.full((32, 32), 1.5, dtype=np.float32)).save(tmp_path / 'f.tiff')
    with pytest.raises(ValueError, match='F-mode image'): ToTensorImage()(tmp_path / 'f.tiff')


def test_cutout_blanks_a_square_cut_off_at_the_border():
    cy, cx = torch.tensor([16, 0, 31]), torch.tensor([16, 0, 5])
    mask = cutout_mask(32, 32, 8, cy, cx)
    assert mask[0].sum() == 64 and mask[0, 12:20, 12:20].all()     # whole, centred
    assert mask[1].sum() == 16 and mask[1, :4, :4].all()           # a corner: a quarter of it
    assert mask[2].sum() == 5 * 8 and mask[2, 27:, 1:9].all()      # the bottom edge: 5 rows of 8
    x = TensorImage(torch.randn(64, 3, 32, 32))
    cut = Cutout(8)(x, split_idx=0)
    blank = (cut == 0).all(1)   # a pixel blanked in every channel
    assert ((cut == x) | blank[:, None]).all() and (blank.flatten(1).sum(1) >= 16).all()
    assert (Cutout(8)(x, split_idx=1) == x).all()   # training only


def test_dataloaders_cut_out_the_training_batches_only(tiny_tgz, tmp_path):
    c = load_cifar(tiny_tgz, COUNTS, cache_dir=tmp_path / 'c')
    cut = lambda dl: [t for t in dl.after_batch.fs if isinstance(t, Cutout)]
    dls = get_dls(bs=8, cifar=c, cutout=12, device='cpu')
    assert [t.size for t in cut(dls.train)] == [12] and (dls.one_batch()[0] == 0).all(1).sum() >= 8 * 36
    assert not cut(get_dls(bs=8, cifar=c, device='cpu').train)


def test_dataloaders_crop_from_the_padding_asked_for(tiny_tgz, tmp_path):
    c = load_cifar(tiny_tgz, COUNTS, cache_dir=tmp_path / 'c')
    pads = lambda dls: [t.pad for t in dls.train.after_batch.fs if isinstance(t, RandomCropFlip)]
    assert pads(get_dls(bs=8, cifar=c, device='cpu')) == [4]
    assert pads(get_dls(bs=8, cifar=c, crop_pad=2, device='cpu')) == [2]
    x = TensorImage(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8))
    out = RandomCropFlip(0)(x, split_idx=0)   # no padding: each image as it is or mirrored
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(out, x))
