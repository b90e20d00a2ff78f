"""fastprune: fast adversarially robust pruning for PyTorch.

Kernels (Triton, CUDA C++, C++ CPU, each with a PyTorch reference) for the three costs of robust
pruning: PGD inner loops, HSIC regularisers and masked-but-dense pruned models.
"""
__version__ = "0.1.0"

from . import attacks, nn, ops
from .backends import available_backends, extension_info, use_backend
from .nn.sparse import load_sparse, save_sparse
from .ops import gaussian_gram, hsic, hsic_bottleneck, pgd_step, pgd_step_

__all__ = [
    "__version__",
    "attacks",
    "available_backends",
    "extension_info",
    "gaussian_gram",
    "hsic",
    "hsic_bottleneck",
    "load_sparse",
    "nn",
    "ops",
    "pgd_step",
    "pgd_step_",
    "save_sparse",
    "use_backend",
]
