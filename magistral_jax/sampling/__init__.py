"""Sampling: strategies, and the jitted prefill + decode loop over the KV cache."""

from magistral_jax.sampling.sampler import Chunk, SampleOutput, Sampler
from magistral_jax.sampling.strategies import GREEDY, MAGISTRAL, PRESETS, SamplingParams

__all__ = ["GREEDY", "MAGISTRAL", "PRESETS", "Chunk", "SampleOutput", "Sampler", "SamplingParams"]
