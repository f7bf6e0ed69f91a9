"""pfunc: functional, JAX-style parametrizations for PyTorch, built on ``torch.func``.

>>> import torch, pfunc as pf
>>> from pfunc.parametrizations import Symmetric
>>> net = pf.parametrize(torch.nn.Linear(4, 4), {"weight": Symmetric()})
>>> params, state = net.init()
>>> out, state = net(params, state, torch.randn(2, 4))
>>> out.shape
torch.Size([2, 4])
"""

from . import ensemble, parametrizations, power, spectral, tree
from . import distributed
from .spectral import singular_values, spectral_norm_spec
from .chain import Chain, Step, as_step
from .grad import grad, grad_and_value  # the functions; the module stays importable as pfunc.grad via sys.modules
from .interop import from_torch, split_state_dict, to_torch
from .parametrize import Parametrized, is_parametrized, parametrize

ParametrizationList = Chain  # torch's name for a chain of parametrizations on one tensor

__version__ = "0.1.0"

#: The oldest torch whose ``torch.compile`` handles pfunc's functional path (``functional_call``
#: under ``torch.func.grad``): 2.4 does not capture ``torch.func.grad``, and 2.5's AOTAutograd fails
#: compiling ``grad_and_value``. Eager pfunc works on every torch ``pyproject.toml`` admits.
COMPILE_MIN_TORCH = "2.6"

__all__ = [
    "COMPILE_MIN_TORCH",
    "Parametrized",
    "parametrize",
    "is_parametrized",
    "Chain",
    "ParametrizationList",
    "Step",
    "as_step",
    "grad",
    "grad_and_value",
    "from_torch",
    "to_torch",
    "split_state_dict",
    "ensemble",
    "distributed",
    "spectral",
    "spectral_norm_spec",
    "singular_values",
    "parametrizations",
    "power",
    "tree",
]
