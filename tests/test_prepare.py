"""``calgan prepare``: BasicSR's sub-image rule, bicubic LR copies, resuming, errors."""

import numpy as np
import pytest

from calgan_fast.cli import main
from calgan_fast.data import PairedFolderDataset, imresize, read_image, write_image


def _basicsr_starts(length, crop, step, thresh):
    # extract_subimages.py: np.arange(0, length - crop + 1, step), plus length - crop when the
    # remainder past the last crop exceeds thresh.
    starts = list(np.arange(0, length - crop + 1, step))
    if length - (starts[-1] + crop) > thresh:
        starts.append(length - crop)
    return starts


# (h, w): 2x2 crops (remainders 50 and 120 exceed 48), 1x1 (remainders 48 and 1 do not),
# 3x1 (960: starts 0, 240, 480 and no remainder).
SIZES = {"a": (530, 600), "b": (528, 481), "c": (960, 500)}


def _hr(folder):
    folder.mkdir()
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(np.sin(xx / (7 + c) + i) * np.cos(yy / (5 + c)) * 120 + 128) for c in range(3)], 2)
        write_image(folder / f"{name}.png", img.astype(np.uint8))
    return folder


def test_prepare_gives_basicsrs_sub_images_and_lr_files(tmp_path, capsys):
    hr, out = _hr(tmp_path / "hr"), tmp_path / "out"
    assert main(["prepare", "--hr", str(hr), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    expected = {}
    for name, (h, w) in SIZES.items():
        ys, xs = _basicsr_starts(h, 480, 240, 48), _basicsr_starts(w, 480, 240, 48)
        for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
            expected[f"{name}_s{i + 1:03d}.png"] = (name, y, x)
    assert len(expected) == 4 + 1 + 3
    assert sorted(p.name for p in (out / "HR_sub").iterdir()) == sorted(expected)
    for s in (2, 3, 4):
        assert sorted(p.name for p in (out / "LR_bicubic_sub" / f"X{s}").iterdir()) == sorted(expected)
    assert f"3 images (0 already done), {len(expected)} sub-images written" in capsys.readouterr().out
    # contents: the HR crop at BasicSR's offset and its MATLAB bicubic downscale
    name, y, x = expected["a_s004.png"]
    crop = read_image(hr / f"{name}.png")[y:y + 480, x:x + 480]
    np.testing.assert_array_equal(read_image(out / "HR_sub" / "a_s004.png"), crop)
    for s in (2, 3, 4):
        lr = read_image(out / "LR_bicubic_sub" / f"X{s}" / "a_s004.png")
        assert lr.shape == (480 // s, 480 // s, 3)
        np.testing.assert_array_equal(lr, imresize(crop, 1 / s))
    pairs = PairedFolderDataset(out / "HR_sub", out / "LR_bicubic_sub" / "X3", scale=3, gt_size=48)
    assert len(pairs) == len(expected)


def test_prepare_resumes_and_runs_in_processes(tmp_path, capsys):
    from calgan_fast.data.prepare import prepare

    hr, out = _hr(tmp_path / "hr"), tmp_path / "out"
    first = prepare(hr, out, scales=[4], workers=2, progress=False)
    assert first == {"images": 3, "skipped": 0, "sub_images": 8}
    stamp = (out / "HR_sub" / "a_s001.png").stat().st_mtime_ns
    assert prepare(hr, out, scales=[4], progress=False) == {"images": 3, "skipped": 3, "sub_images": 0}
    assert (out / "HR_sub" / "a_s001.png").stat().st_mtime_ns == stamp
    # an image whose run was interrupted (no record of it being finished) is done again
    (out / ".done" / "b").unlink()
    (out / "HR_sub" / "b_s001.png").unlink()
    assert prepare(hr, out, scales=[4], progress=False) == {"images": 3, "skipped": 2, "sub_images": 1}
    assert (out / "HR_sub" / "b_s001.png").is_file()
    with pytest.raises(ValueError, match="prepared with other settings"):
        prepare(hr, out, scales=[2], progress=False)


def test_prepare_errors_name_the_file(tmp_path, capsys):
    hr = _hr(tmp_path / "hr")
    (hr / "broken.png").write_bytes(b"\x89PNG not really")
    assert main(["prepare", "--hr", str(hr), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calgan: error: ") and "\n" not in err and "broken.png: cannot decode image" in err
    assert main(["prepare", "--hr", str(hr), "--out", str(tmp_path / "o2"), "--crop-size", "100"]) == 2
    assert "crop_size 100 is not divisible by scale(s) [3]" in capsys.readouterr().err
