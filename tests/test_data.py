import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from calgan_fast.data import (
    HRFolderDataset,
    ImageError,
    PairedFolderDataset,
    TrainSampler,
    image_size,
    imresize,
    list_images,
    read_image,
    resize_weights,
    sample_images,
    write_image,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _bicubic_sets():
    found = []
    for name in ("Set5", "Set14"):
        hr_dir, lr_dir = SHARED_DATA / name / "HR", SHARED_DATA / name / "LR_bicubic" / "X4"
        if hr_dir.is_dir() and lr_dir.is_dir():
            found += [(p, lr_dir / f"{p.stem}x4.png") for p in sorted(hr_dir.glob("*.png"))]
    return found


@pytest.mark.skipif(not _bicubic_sets(), reason="Set5/Set14 with LR_bicubic/X4 not present")
def test_imresize_matches_published_x4_sets():
    pairs = [(h, lr) for h, lr in _bicubic_sets() if lr.exists()]
    assert pairs
    for hr_path, lr_path in pairs:
        lr = read_image(lr_path)
        hr = read_image(hr_path)[: lr.shape[0] * 4, : lr.shape[1] * 4]
        out = imresize(hr, 0.25)
        assert out.shape == lr.shape, hr_path.name
        assert np.array_equal(out, lr), f"{hr_path.name}: max diff {np.abs(out.astype(int) - lr).max()}"


# Stored MATLAB-convention results on small synthetic images (uint8: rounded after each pass).
_IMG9x11 = np.array(
    [[162, 4, 154, 238, 218, 44, 76, 31, 156, 250, 175],
     [183, 123, 91, 151, 227, 21, 61, 85, 203, 103, 147],
     [50, 26, 112, 108, 241, 126, 105, 237, 236, 220, 37],
     [209, 204, 137, 10, 7, 193, 16, 87, 143, 226, 73],
     [206, 105, 244, 151, 103, 209, 2, 166, 240, 15, 124],
     [78, 224, 253, 224, 244, 219, 170, 100, 147, 133, 145],
     [249, 47, 147, 18, 45, 185, 222, 195, 18, 161, 171],
     [117, 23, 206, 46, 122, 167, 212, 253, 107, 180, 82],
     [92, 28, 189, 179, 215, 248, 233, 178, 145, 18, 108]], dtype=np.uint8)
_HALF = [[107, 162, 138, 69, 177, 163], [134, 99, 119, 118, 187, 79], [174, 187, 164, 125, 132, 125],
         [126, 108, 146, 205, 122, 137], [68, 164, 219, 216, 100, 79]]
_FLOAT_3x4 = [[0.444213, 0.576504, 0.383436, 0.646247], [0.649848, 0.545337, 0.53155, 0.518132],
              [0.438235, 0.615468, 0.773794, 0.443982]]
_IMG7x6 = np.array(
    [[130, 242, 36, 241, 79, 107], [211, 104, 140, 7, 192, 137], [84, 201, 77, 115, 34, 102],
     [51, 66, 191, 71, 123, 250], [245, 184, 138, 70, 40, 247], [131, 29, 158, 198, 156, 233],
     [10, 134, 117, 15, 163, 217]], dtype=np.uint8)


def test_imresize_stored_values():
    rgb = np.stack([_IMG9x11, _IMG9x11[::-1], _IMG9x11[:, ::-1]], axis=2)
    out = imresize(rgb, 0.5)
    assert out.dtype == np.uint8 and out.shape == (5, 6, 3)
    assert out[:, :, 0].tolist() == _HALF
    assert np.array_equal(out[:, :, 1], imresize(_IMG9x11[::-1], 0.5))  # channels independent
    flt = imresize(_IMG9x11.astype(np.float64) / 255, output_shape=(3, 4))
    np.testing.assert_allclose(flt, _FLOAT_3x4, atol=1e-6)
    assert imresize(_IMG7x6, 1 / 3).tolist() == [[139, 115], [120, 151], [92, 166]]
    assert imresize(_IMG7x6, 2.0)[0].tolist() == [110, 154, 244, 212, 60, 61, 216, 232, 109, 62, 92, 107]


def test_imresize_properties():
    for n_in, n_out, s in ((17, 5, 5 / 17), (8, 2, 0.25), (6, 12, 2.0)):
        w = resize_weights(n_in, n_out, s)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    const = np.full((12, 16, 3), 77, np.uint8)
    assert (imresize(const, 0.25) == 77).all()
    with pytest.raises(ValueError, match="exactly one of scale and output_shape"):
        imresize(const)


def _write_noise(path, h, w, seed=0):
    img = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    write_image(path, img)
    return img


def test_read_write_roundtrip(tmp_path):
    img = _write_noise(tmp_path / "a.png", 10, 12)
    assert np.array_equal(read_image(tmp_path / "a.png"), img)
    grey = (np.arange(20, dtype=np.uint8) * 10).reshape(4, 5)
    write_image(tmp_path / "g.png", grey)
    out = read_image(tmp_path / "g.png")
    assert out.shape == (4, 5, 3) and np.array_equal(out[:, :, 1], grey)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


def test_header_sizes(tmp_path):
    img = _write_noise(tmp_path / "a.png", 10, 12)
    write_image(tmp_path / "a.jpg", img)
    write_image(tmp_path / "a.bmp", img)
    for ext in ("png", "jpg", "bmp"):
        assert image_size(tmp_path / f"a.{ext}") == (10, 12), ext
    import skimage.data

    rocket = Path(skimage.data.__file__).parent / "rocket.jpg"  # a real camera JPEG
    assert image_size(rocket) == read_image(rocket).shape[:2]


def test_bad_images_give_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="nothere: dataroot_gt not found"):
        list_images(tmp_path / "nothere", "dataroot_gt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="holds no images"):
        list_images(tmp_path / "empty")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError, match=r"corrupt\.png: cannot decode image"):
        read_image(tmp_path / "corrupt.png")
    _write_noise(tmp_path / "small.png", 8, 8)
    with pytest.raises(ImageError, match=r"small\.png: 8x8 image is smaller than the 32-pixel side"):
        read_image(tmp_path / "small.png", min_size=32)
    # A PNG whose header claims 60000 x 60000 pixels is refused before it is decoded.
    _write_noise(tmp_path / "bomb.png", 4, 4)
    data = bytearray((tmp_path / "bomb.png").read_bytes())
    data[16:24] = struct.pack(">II", 60000, 60000)
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    with pytest.raises(ImageError, match=r"bomb\.png: 60000x60000 image exceeds the limit"):
        read_image(tmp_path / "bomb.png")


def test_hr_folder_dataset(tmp_path):
    hr = _write_noise(tmp_path / "a.png", 40, 48)
    ds = HRFolderDataset(tmp_path, scale=4, gt_size=16)
    item = ds[(0, 123)]
    assert item["gt"].shape == (3, 16, 16) and item["lq"].shape == (3, 4, 4)
    assert torch.equal(ds[(0, 123)]["gt"], item["gt"])  # the seed fixes crop and augmentation
    # Without augmentation, the crop is a window of the image and LR is its bicubic x4 downscale.
    plain = HRFolderDataset(tmp_path, scale=4, gt_size=16, use_hflip=False, use_rot=False)
    it = plain[(0, 5)]
    crop = (it["gt"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    found = [(t, le) for t in range(25) for le in range(33)
             if np.array_equal(hr[t:t + 16, le:le + 16], crop)]
    assert found
    lq = (it["lq"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert np.array_equal(lq, imresize(crop, 0.25))
    full = HRFolderDataset(tmp_path, scale=3, gt_size=None)[0]
    assert full["gt"].shape == (3, 39, 48) and full["lq"].shape == (3, 13, 16)
    with pytest.raises(ValueError, match="gt_size: 18 is not a multiple of scale 4"):
        HRFolderDataset(tmp_path, scale=4, gt_size=18)


def test_dataset_skips_bad_images_when_configured(tmp_path):
    _write_noise(tmp_path / "a.png", 32, 32)
    _write_noise(tmp_path / "tiny.png", 8, 8)
    (tmp_path / "z_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ImageError, match=r"tiny\.png: 8x8 image is smaller than the 16-pixel"):
        HRFolderDataset(tmp_path, scale=4, gt_size=16)
    with pytest.warns(UserWarning, match="skipping .*tiny.png"):
        ds = HRFolderDataset(tmp_path, scale=4, gt_size=16, skip_bad=True)
    assert len(ds) == 2
    with pytest.warns(UserWarning, match="skipping .*z_corrupt.png: cannot decode"):
        item = ds[(1, 0)]
    assert item["path"].endswith("a.png")
    (tmp_path / "tiny.png").unlink()
    ds = HRFolderDataset(tmp_path, scale=4, gt_size=16)
    with pytest.raises(ImageError, match="z_corrupt.png: cannot decode"):
        ds[(1, 0)]


def test_paired_dataset(tmp_path):
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    hr = _write_noise(tmp_path / "hr" / "baby.png", 32, 40)
    write_image(tmp_path / "lr" / "babyx4.png", imresize(hr, 0.25))
    ds = PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", scale=4, gt_size=16)
    it = ds[(0, 9)]
    gt = (it["gt"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    lq = (it["lq"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
    assert gt.shape == (16, 16, 3) and lq.shape == (4, 4, 3)
    whole = PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", scale=4)[0]
    assert whole["lq"].shape == (3, 8, 10) and whole["gt"].shape == (3, 32, 40)
    _write_noise(tmp_path / "hr" / "zebra.png", 16, 16)
    with pytest.raises(ImageError, match=r"lr: no LR image for zebra.png"):
        PairedFolderDataset(tmp_path / "hr", tmp_path / "lr", scale=4)


def test_sampler_resume_and_ranks():
    def take(s, k):
        it = iter(s)
        return [next(it) for _ in range(k)]

    full = take(TrainSampler(5, seed=3), 13)
    assert sorted(i for i, _ in full[:5]) == list(range(5))  # an epoch is a permutation
    assert take(TrainSampler(5, seed=3, start=7), 6) == full[7:]
    r0 = take(TrainSampler(5, seed=3, rank=0, world_size=2), 6)
    r1 = take(TrainSampler(5, seed=3, rank=1, world_size=2), 6)
    assert [x for pair in zip(r0, r1) for x in pair] == full[:12]


def test_loader_workers_do_not_change_samples(tmp_path):
    for i in range(3):
        _write_noise(tmp_path / f"{i}.png", 24, 24, seed=i)
    ds = HRFolderDataset(tmp_path, scale=4, gt_size=16)

    def batches(workers):
        dl = DataLoader(ds, batch_size=2, sampler=TrainSampler(len(ds), seed=1), num_workers=workers)
        it = iter(dl)
        return [next(it)["gt"] for _ in range(3)]

    for a, b in zip(batches(0), batches(2)):
        assert torch.equal(a, b)


def test_sample_images(tmp_path):
    train = sample_images(tmp_path)
    val = sample_images(tmp_path, "val")
    names = {p.name for p in list_images(train)}
    assert len(names) >= 3 and not names & {p.name for p in list_images(val)}
    stamp = {p: p.stat().st_mtime_ns for p in list_images(train)}
    sample_images(tmp_path)  # second call reuses the files
    assert stamp == {p: p.stat().st_mtime_ns for p in list_images(train)}
    assert min(read_image(p).shape[0] for p in stamp) >= 256
