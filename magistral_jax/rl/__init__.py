"""Reinforcement learning: objectives (`losses`), rewards (`rewards`: the registry), the reward pool
(`pool`) and the sandbox for code rewards (`sandbox`).

Importing the package registers every reward of it (`magistral_rewards` registers `magistral`).
It is kept free of heavy imports, so that reward worker processes load only what they need.
"""

from magistral_jax.rl import magistral_rewards  # noqa: F401  (registers `magistral`)
