"""Ahead-of-time planning for TPU slices."""
