import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from calgan_fast.metrics import DISTS, LPIPS, InceptionFeatures, fid, frechet_distance, psnr, rgb_to_y, ssim


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
    assert psnr(img, ref, border, True) == pytest.approx(peak_signal_noise_ratio(b, a, data_range=255), abs=1e-9)
    exp = structural_similarity(b, a, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
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


def _vgg16_features_file(path):
    from torchvision.models.vgg import cfgs, make_layers

    with torch.device("meta"):
        feats = make_layers(cfgs["D"])
    g = torch.Generator().manual_seed(0)
    # Random weights scaled to keep activations O(1) through 13 convs.
    sd = {f"features.{k}": torch.randn(v.shape, generator=g) * (2.0 / (v[0].numel() if v.dim() > 1 else 1e4)) ** 0.5
          for k, v in feats.state_dict().items()}
    torch.save(sd, path)


def _lin_file(path, scale=1.0):
    g = torch.Generator().manual_seed(1)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * scale
                for i, c in enumerate((64, 128, 256, 512, 512))}, path)


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    _vgg16_features_file(path)
    return path


def test_lpips_with_local_random_weights(tmp_path, vgg16_file):
    _lin_file(tmp_path / "lin.pth")
    _lin_file(tmp_path / "lin2.pth", scale=2.0)
    m = LPIPS(vgg16_file, tmp_path / "lin.pth")
    m2 = LPIPS(vgg16_file, tmp_path / "lin2.pth")
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)
    c = torch.rand(2, 3, 32, 32, generator=g)
    d_ab, d_ba, d_ac = m(a, b), m(b, a), m(a, c)
    assert d_ab.shape == (2,)
    torch.testing.assert_close(m(a, a), torch.zeros(2))
    torch.testing.assert_close(d_ab, d_ba)
    assert (d_ab > 0).all() and (d_ac > d_ab).all()  # farther image, larger distance
    torch.testing.assert_close(m2(a, b), 2 * d_ab)  # linear in the lin weights


def test_dists_with_local_random_weights(tmp_path, vgg16_file):
    g = torch.Generator().manual_seed(2)
    torch.save({"alpha": torch.rand(1, 1475, 1, 1, generator=g), "beta": torch.rand(1, 1475, 1, 1, generator=g)},
               tmp_path / "ab.pt")
    m = DISTS(vgg16_file, tmp_path / "ab.pt")
    a = torch.rand(2, 3, 32, 32, generator=g)
    b = (a + 0.1 * torch.randn(2, 3, 32, 32, generator=g)).clamp(0, 1)
    c = torch.rand(2, 3, 32, 32, generator=g)
    torch.testing.assert_close(m(a, a), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(m(a, b), m(b, a))
    assert (m(a, b) > 1e-4).all() and (m(a, c) > m(a, b)).all()
    torch.save({"alpha": torch.rand(1, 10, 1, 1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="'alpha' with 1475 values not found"):
        DISTS(vgg16_file, tmp_path / "bad.pt")


def test_learned_metrics_name_missing_files(tmp_path, vgg16_file):
    with pytest.raises(FileNotFoundError, match=r"VGG16 \(LPIPS backbone\) weights not found: looked for .*nope\.pth"):
        LPIPS(tmp_path / "nope.pth", tmp_path / "lin.pth")
    with pytest.raises(FileNotFoundError, match=r"LPIPS linear layers weights not found: .*lin\.pth"):
        LPIPS(vgg16_file, tmp_path / "lin.pth")
    with pytest.raises(FileNotFoundError, match=r"DISTS alpha/beta weights not found: .*ab\.pt"):
        DISTS(vgg16_file, tmp_path / "ab.pt")
    with pytest.raises(FileNotFoundError, match=r"Inception-v3 \(FID\) weights not found: .*incep\.pth"):
        InceptionFeatures(tmp_path / "incep.pth")


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = rng.random(4) + 0.1, rng.random(4) + 0.1
    exp = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(exp, rel=1e-9)
    a = rng.normal(size=(50, 4))
    cov = np.cov(a, rowvar=False)
    assert frechet_distance(a.mean(0), cov, a.mean(0), cov) == pytest.approx(0.0, abs=1e-6)


def test_fid_with_a_small_extractor():
    ext = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())  # (B, 12) features
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(8, 3, 8, 8, generator=g) for _ in range(4)]
    assert fid(ext, xs, xs) == pytest.approx(0.0, abs=1e-6)
    assert fid(ext, xs, [x * 0.5 for x in xs]) > 0.1
