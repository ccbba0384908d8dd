"""The quantizer family: one file per method, one contract (see ``base.py``).

    >>> from stage1_tokenizer.quantizers import build_quantizer
    >>> q = build_quantizer("nsvq", codebook_size=1024, dim=64, tau=1.0)
"""

from __future__ import annotations

from .base import Quantizer, QuantizerOutput
from .ema import EMAQuantizer
from .fc import FactorizedQuantizer
from .nsvq import NonStationaryVQ
from .simvq import SimVQ
from .transvq import TransVQ
from .usage import CodebookUsage
from .vq import VectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "ema": EMAQuantizer,
    "fc": FactorizedQuantizer,
    "simvq": SimVQ,
    "nsvq": NonStationaryVQ,
    "transvq": TransVQ,
}


def build_quantizer(name: str, codebook_size: int, dim: int, **options) -> Quantizer:
    """Build a quantizer by name (one of ``QUANTIZERS``) with its own keyword options."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
    cls = QUANTIZERS[name]
    try:
        return cls(codebook_size=codebook_size, dim=dim, **options)
    except TypeError as err:  # an option this quantizer does not take
        raise ValueError(f"bad option for quantizer {name!r}: {err}") from None


__all__ = ["QUANTIZERS", "CodebookUsage", "Quantizer", "QuantizerOutput", "build_quantizer"]
