"The data path: tiny archives and folders built here, their errors, the cache, the batch augmentation."
import io, tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from normnets_data import (CIFAR10_CLASSES, CifarDataError, RandomCropFlip, get_dls, load_cifar)
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
    b = load_cifar(tmp_path / 'folder', COUNTS, cache_dir=tmp_path / 'c2')     # the parent of cifar10/ works too
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
    with pytest.raises(CifarDataError, match=r'train/ holds class folders none, expected the 10 CIFAR-10 classes'):
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
    torch.testing.assert_close(xv[:8], (raw - torch.tensor(mean)[:, None, None].float()) / torch.tensor(std)[:, None, None].float(), atol=1e-4, rtol=1e-4)
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
