"""Stage one: the VQ-GAN image tokenizer and its quantizers.

``VQTokenizer`` is imported on first use: it pulls in diffusers, which costs seconds, and code that only
needs the quantizers (benchmarks, multi-process workers) should not pay for it.
"""

__all__ = ["VQTokenizer"]


def __getattr__(name):
    if name == "VQTokenizer":
        from .model import VQTokenizer

        return VQTokenizer
    raise AttributeError(f"module 'stage1_tokenizer' has no attribute {name!r}")
