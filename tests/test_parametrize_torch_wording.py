"""Where pfunc raises for the reason torch raises, torch's message is kept whole (issue 17, item 7).

Each scenario is one of PyTorch's own ``test/nn/test_parametrization.py`` checks (its
``assertRaisesRegex`` pattern quoted as it is there), run on torch and on pfunc: both must raise the
same type matching torch's pattern, and torch's whole message must be a substring of pfunc's (pfunc
adds the tensor's name after it).
"""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize as TP

import pfunc as pf
from pfunc.parametrizations import Cayley, Orthogonal, Skew


class Identity(nn.Module):
    def forward(self, x):
        return x


class Resize(nn.Module):
    def forward(self, X):
        return X[[0]]


class ChangeDtype(nn.Module):
    def forward(self, x):
        return x.bool()


class ChangeShape(nn.Module):
    def forward(self, x):
        return x[:-1]


class ChangeDtypeMulti(nn.Module):
    def forward(self, x, y):
        return (x + y).bool()

    def right_inverse(self, w):
        return w, w + 1


class WrongReturn(nn.Module):
    def forward(self, x):
        return x, x


class WrongReturnInverse(Identity):
    def right_inverse(self, x):
        return x, x


class ChangeDtypeInverse(Identity):
    def right_inverse(self, x):
        return x.bool()


class ChangeShapeInverse(Identity):
    def right_inverse(self, x):
        return x[:-1]


class RankOne(nn.Module):
    def forward(self, x, y):
        return x.unsqueeze(-1) @ y.unsqueeze(-2)

    def right_inverse(self, Y):
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        s0_sqrt = S[0].sqrt().unsqueeze(-1)
        return U[..., :, 0] * s0_sqrt, Vh[..., 0, :] * s0_sqrt


def _torch_register(first=None, unsafe=False):
    def run(p):
        m = nn.Linear(3, 4)
        if first is not None:
            TP.register_parametrization(m, "weight", first())
        TP.register_parametrization(m, "weight", p, unsafe=unsafe)

    return run


def _pfunc_register(first=None, unsafe=False):
    def run(p):
        net = pf.parametrize(nn.Linear(3, 4), {"weight": first()} if first is not None else {})
        params, state = net.init()
        net.register(params, state, "weight", p, unsafe=unsafe)

    return run


def _torch_remove_multi():
    m = nn.Linear(3, 3)
    TP.register_parametrization(m, "weight", RankOne())
    TP.remove_parametrizations(m, "weight", leave_parametrized=False)


def _pfunc_remove_multi():
    net = pf.parametrize(nn.Linear(3, 3), {"weight": RankOne()})
    params, state = net.init()
    net.remove(params, state, "weight", leave_parametrized=False)


def _torch_orthogonal_assign():
    m = P.orthogonal(nn.Linear(3, 4))
    m.weight = torch.randn(5, 5)


def _pfunc_orthogonal_assign(unsafe):
    def run():
        net = pf.parametrize(nn.Linear(3, 4), {"weight": Orthogonal()}, unsafe=unsafe)
        params, state = net.init()
        net.assign(params, state, {"weight": torch.randn(5, 5)})

    return run


# (test id, torch's regex in its test suite, exception type, torch's call, pfunc's call)
SCENARIOS = [
    ("resize", "Registering a parametrization may not change the shape of the tensor", ValueError,
     lambda: _torch_register()(Resize()), lambda: _pfunc_register()(Resize())),
    ("change_dtype", "may not change the dtype", ValueError,
     lambda: _torch_register()(ChangeDtype()), lambda: _pfunc_register()(ChangeDtype())),
    ("change_shape", "may not change the shape", ValueError,
     lambda: _torch_register()(ChangeShape()), lambda: _pfunc_register()(ChangeShape())),
    ("change_dtype_multi", "may not change the dtype", ValueError,
     lambda: _torch_register()(ChangeDtypeMulti()), lambda: _pfunc_register()(ChangeDtypeMulti())),
    ("chained_wrong_return", "must return a tensor", ValueError,
     lambda: _torch_register(Identity)(WrongReturn()), lambda: _pfunc_register(Identity)(WrongReturn())),
    ("chained_change_dtype", "may not change the dtype", ValueError,
     lambda: _torch_register(Identity)(ChangeDtype()), lambda: _pfunc_register(Identity)(ChangeDtype())),
    ("chained_change_shape", "may not change the shape", ValueError,
     lambda: _torch_register(Identity)(ChangeShape()), lambda: _pfunc_register(Identity)(ChangeShape())),
    ("chained_wrong_return_inverse", "right_inverse must return a tensor", ValueError,
     lambda: _torch_register(Identity)(WrongReturnInverse()), lambda: _pfunc_register(Identity)(WrongReturnInverse())),
    ("chained_change_dtype_inverse", "must have the same dtype", ValueError,
     lambda: _torch_register(Identity)(ChangeDtypeInverse()), lambda: _pfunc_register(Identity)(ChangeDtypeInverse())),
    ("chained_change_shape_inverse", "must have the same shape", ValueError,
     lambda: _torch_register(Identity)(ChangeShapeInverse()), lambda: _pfunc_register(Identity)(ChangeShapeInverse())),
    ("remove_multi_input", "leave_parametrized=False", ValueError, _torch_remove_multi, _pfunc_remove_multi),
    ("orthogonal_map", "has to be one of", ValueError,
     lambda: P.orthogonal(nn.Linear(3, 4), "weight", "foo"), lambda: pf.parametrize(nn.Linear(3, 4), {"weight": Orthogonal("foo")})),
    ("orthogonal_on_a_vector", "Expected a matrix", ValueError,
     lambda: P.orthogonal(nn.Linear(3, 4), "bias"), lambda: pf.parametrize(nn.Linear(3, 4), {"bias": Orthogonal()})),
    ("orthogonal_assign_wrong_shape", "matrices of shape", ValueError, _torch_orthogonal_assign, _pfunc_orthogonal_assign(False)),
    # torch's orthogonal is registered unsafe, and refuses the shape anyway: so must pfunc's
    ("orthogonal_assign_wrong_shape_unsafe", "matrices of shape", ValueError, _torch_orthogonal_assign, _pfunc_orthogonal_assign(True)),
]


@pytest.mark.parametrize("regex, kind, torch_call, pfunc_call", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_pfuncs_error_matches_torchs_test_regex_and_contains_torchs_whole_message(regex, kind, torch_call, pfunc_call):
    with pytest.raises(kind, match=regex) as torch_error:
        torch_call()
    with pytest.raises(kind, match=regex) as pfunc_error:
        pfunc_call()
    assert str(torch_error.value) in str(pfunc_error.value)


def test_a_chain_failing_deep_in_torch_names_the_tensor_and_the_step():
    # Skew then Cayley on a non-square weight: torch's own error would name neither
    with pytest.raises(ValueError, match=r"'0.weight': parametrization 0 \(Skew\)"):
        pf.parametrize(nn.Sequential(nn.Linear(8, 4)), {"0.weight": [Skew(), Cayley()]})
    # a user's step whose forward fails in a torch op: same type as torch's error, named
    net = pf.parametrize(nn.Linear(4, 4), {"weight": Skew()})
    params, state = net.init()
    with pytest.raises(RuntimeError, match=r"'weight': parametrization 1 \(<lambda>\) failed in forward: .*size of tensor a"):
        net.register(params, state, "weight", lambda X: X[:, :3] - X[:3])
