"""pfunc._vmap: vmap detection at any functorch level, and the CPU matrix-vector products."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pfunc._vmap import is_vmapped, mv, mv_adjoint


def _seen(transform, x):
    seen = []

    def f(t):
        seen.append(is_vmapped(t))
        return t.sum()

    transform(f)(x)
    return seen[0]


def test_is_vmapped_sees_vmap_at_any_level_and_only_vmap():
    x = torch.randn(3, 4)
    assert _seen(lambda f: f, x) is False
    assert _seen(torch.func.grad, x) is False
    assert _seen(torch.func.vmap, x) is True
    assert _seen(lambda f: torch.func.vmap(torch.func.grad(f)), x) is True   # batched under a grad wrapper
    assert _seen(lambda f: torch.func.grad(lambda t: torch.func.vmap(f)(t).sum()), x) is True
    assert is_vmapped(torch.nn.Parameter(x)) is False


@given(h=st.integers(1, 6), w=st.integers(1, 6), n=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_vmapped_products_equal_a_loop_of_torch_mv(h, w, n, seed):
    g = torch.Generator().manual_seed(seed)
    W, x, y = torch.randn(n, h, w, generator=g), torch.randn(n, w, generator=g), torch.randn(n, h, generator=g)
    torch.testing.assert_close(torch.func.vmap(mv)(W, x), torch.stack([torch.mv(W[i], x[i]) for i in range(n)]))
    torch.testing.assert_close(
        torch.func.vmap(mv_adjoint)(W, y), torch.stack([torch.mv(W[i].mT, y[i]) for i in range(n)])
    )


def test_outside_vmap_the_products_are_torch_mv_bitwise():
    W, x, y = torch.randn(7, 5), torch.randn(5), torch.randn(7)
    assert torch.equal(mv(W, x), torch.mv(W, x))
    assert torch.equal(mv_adjoint(W, y), torch.mv(W.mH, y))


def test_complex_matrices_keep_the_conjugate_transpose_under_vmap():
    W = torch.randn(2, 3, 4, dtype=torch.complex128)
    y = torch.randn(2, 3, dtype=torch.complex128)
    expected = torch.stack([torch.mv(W[i].mH, y[i]) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(mv_adjoint)(W, y), expected)


@pytest.mark.parametrize("batched", [False, True])
def test_gradients_flow_through_the_products(batched):
    W, x = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    f = lambda W, x: mv(W, x).pow(2).sum()  # noqa: E731
    if batched:
        g = torch.func.vmap(torch.func.grad(f))(W, x)
    else:
        g = torch.stack([torch.func.grad(f)(W[i], x[i]) for i in range(2)])
    expected = torch.stack([2 * torch.outer(W[i] @ x[i], x[i]) for i in range(2)])
    torch.testing.assert_close(g, expected)
