"""Shared fixtures: the packaged SmolLM2 GGUF, its Flax parameters and a PyTorch reference."""

import pathlib

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> pathlib.Path:
    """Path of the packaged SmolLM2 GGUF file; skips the test when the package is missing."""
    from ckt_jax.loading import find_smollm2_gguf

    try:
        return find_smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def torch_available():
    """The torch module; skips the test when torch is not installed."""
    return pytest.importorskip("torch", reason="torch is not installed (install the test extras)")


@pytest.fixture(scope="session")
def peft_available(torch_available):
    """The peft module; skips the test when torch or peft is not installed."""
    return pytest.importorskip("peft", reason="peft is not installed (install the test extras)")


@pytest.fixture(scope="session")
def smollm2_flax(smollm2_gguf_path):
    """(config, params) of SmolLM2 loaded once per session, params on the JAX device."""
    import jax

    from ckt_jax.loading import load_gguf

    config, params = load_gguf(smollm2_gguf_path)
    return config, jax.device_put(params)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf_path, tmp_path_factory):
    from ckt_jax.tokenizer import ChatTokenizer

    return ChatTokenizer.from_gguf(smollm2_gguf_path,
                                   cache_dir=tmp_path_factory.mktemp("tokenizer") / "smollm2")


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_gguf_path, torch_available):
    """transformers' float32 SmolLM2 built from the same GGUF file (about 12 s to load)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name,
        dtype=torch_available.float32)
    return model.eval()


@pytest.fixture(scope="session")
def subprocess_env(tmp_path_factory) -> dict:
    """Environment for JAX test subprocesses: CPU only, sharing one persistent compilation cache.

    Restarted training processes compile the same train step again; the cache turns those
    compilations into file reads.
    """
    import os

    cache = tmp_path_factory.mktemp("jax_compilation_cache")
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
