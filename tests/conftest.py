"""Test configuration: 8 fake CPU devices, float32 'highest' matmuls, offline HF caches.

This must run before anything imports jax, so it sits at the top of the tests tree."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HF_HOME" not in os.environ:
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="safejax-hf-home-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)  # one per session, removed after

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "SAFEJAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "safejax-test-jax-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import pytest  # noqa: E402

PKU_SAMPLE_ENV = "SAFEJAX_PKU_SAMPLE"


@pytest.fixture(scope="session")
def pku_sample_path():
    """Path of the real PKU-SafeRLHF sample (set by .ci/run when ../shared/data exists)."""
    path = os.environ.get(PKU_SAMPLE_ENV)
    if not path:
        here = os.path.dirname(os.path.abspath(__file__))
        cand = os.path.join(here, "..", "..", "shared", "data", "pku-saferlhf-sample", "test.jsonl")
        path = cand if os.path.exists(cand) else None
    if not path or not os.path.exists(path):
        pytest.skip(f"real PKU-SafeRLHF sample not available (set {PKU_SAMPLE_ENV})")
    return path
