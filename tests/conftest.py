"""Shared test settings.

One intra-op thread: the tests use tiny tensors, where a second thread only adds synchronisation cost
(measured: the quantizer tests take 28 s with two threads and 3 s with one on a 2-core machine).
"""

import torch

torch.set_num_threads(1)
