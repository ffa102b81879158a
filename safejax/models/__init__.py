"""Decoder-only models in Flax NNX (Llama family: Llama/Mistral/Qwen2; GPT-2), score models, KV cache, and
HF checkpoint I/O."""

from safejax.models.config import ModelConfig
from safejax.models.hf import check_tokenizer_fits, load_pretrained, resize_token_embeddings, save_pretrained
from safejax.models.llama import CausalLM, KVCache, init_cache
from safejax.models.score import ScoreModel, ScoreOutput

__all__ = [
    "ModelConfig", "CausalLM", "ScoreModel", "ScoreOutput", "KVCache", "init_cache", "load_pretrained",
    "save_pretrained", "resize_token_embeddings", "check_tokenizer_fits",
]
