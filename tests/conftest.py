"""Shared fixtures. Real-model fixtures are session-scoped: SmolLM2 loads once per run."""
import os

# Triton reads TRITON_INTERPRET when it and the kernels are first imported, and other test modules
# (transformers, hub) may import triton early: set it before anything else, so the Triton kernels run
# in the interpreter on CPU-only machines. Dispatch "auto" still picks torch for CPU tensors.
import torch  # noqa: E402  (the CPU build does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Nothing in the test suite may reach the network Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny SAEs: faster, and steadier on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) for the embedded SmolLM2-135M, fp32, eval mode (slow tests only)."""
    from hf_sae.data.models import load_default_model

    model, tokenizer = load_default_model()
    return model, tokenizer
