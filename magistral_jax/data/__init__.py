"""Data: prompt and example sources with resumable state."""
