"""Stage two: token-grid datasets and the autoregressive prior."""
