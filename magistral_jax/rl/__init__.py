"""Reinforcement learning: objectives (`losses`) and rewards (`rewards`).

Kept free of heavy imports, so that reward worker processes load only what they need.
"""
