import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from calgan_fast.metrics import psnr, rgb_to_y, ssim


def _pair(seed=0, shape=(40, 52, 3), noise=12):
    rng = np.random.default_rng(seed)
    ref = (rng.random(shape) * 255).astype(np.uint8)
    img = np.clip(ref.astype(int) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return img, ref


def test_y_channel_bt601():
    px = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [255, 255, 255]]], np.uint8)
    np.testing.assert_allclose(rgb_to_y(px)[0], [16 + 65.481, 16 + 128.553, 16 + 24.966, 16, 235], atol=1e-9)


@pytest.mark.parametrize("border", [0, 4])
def test_psnr_ssim_y_match_skimage(border):
    img, ref = _pair()
    sl = slice(border, -border if border else None)
    a, b = rgb_to_y(img)[sl, sl], rgb_to_y(ref)[sl, sl]
    want = peak_signal_noise_ratio(b, a, data_range=255)
    assert psnr(img, ref, border, True) == pytest.approx(want, abs=1e-9)
    exp = structural_similarity(b, a, data_range=255, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert ssim(img, ref, border, True) == pytest.approx(exp, abs=1e-7)


def test_psnr_ssim_rgb_match_skimage():
    img, ref = _pair(1)
    assert psnr(img, ref) == pytest.approx(peak_signal_noise_ratio(ref, img, data_range=255), abs=1e-9)
    exp = structural_similarity(ref.astype(float), img.astype(float), data_range=255, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False, channel_axis=2)
    assert ssim(img, ref) == pytest.approx(exp, abs=1e-7)


def test_psnr_ssim_edges():
    img, ref = _pair(2)
    assert psnr(ref, ref) == float("inf")
    assert ssim(ref, ref, 4, True) == pytest.approx(1.0)
    assert psnr(img, ref, 4, True) > psnr(_pair(2, noise=40)[0], ref, 4, True)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(img[:-1], ref)
    with pytest.raises(ValueError, match="crop_border: 30 leaves nothing"):
        psnr(img, ref, 30)
