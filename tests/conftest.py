import os

import pytest
import torch

# Triton fixes interpreted-or-compiled for its own library functions when triton.language is
# first imported. Without a GPU its kernels can only run through the interpreter, so import it in
# interpreter mode before anything else does; the variable itself is then unset again, and only
# the tests that run Triton kernels on CPU tensors (tests/test_triton.py) turn it on.
if "TRITON_INTERPRET" not in os.environ:
    try:
        _gpu = torch.cuda.is_available()
    except Exception:
        _gpu = False
    if not _gpu:
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
        except ImportError:
            pass
        finally:
            del os.environ["TRITON_INTERPRET"]


def _has_gpu() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


def _has_cuda_ext() -> bool:
    from calgan_fast.ops.backends import extension

    ext = extension()
    return ext is not None and getattr(ext, "WITH_CUDA", False) and _has_gpu()


def pytest_collection_modifyitems(config, items):
    gpu = _has_gpu()
    cuda = _has_cuda_ext()
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    skip_cuda = pytest.mark.skip(reason="needs calgan_fast._C built with CUDA and a GPU")
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(skip_gpu)
        if "cuda" in item.keywords and not cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 tolerances assume exact fp32 matmuls.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
