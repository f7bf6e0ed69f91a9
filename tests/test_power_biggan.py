"""pfunc's BigGAN-mode spectral norm against an independent transcription of BigGAN-PyTorch's algorithm.

The reference below is written from BigGAN-PyTorch's layers (its ``SN`` mix-in with
``SNLinear``/``SNConv2d``/``SNEmbedding``) and the ``power_iteration`` /
``gram_schmidt`` / ``proj`` helpers of BigGAN-PyTorch's ``layers.py`` that it
calls: row vectors of shape ``(1, n)``, ``torch.mm`` projections, ``F.normalize``,
singular vectors written into buffers in place (``u_[i][:] = u``) only in training,
``sv`` buffers written in training "for logging", and ``weight / svs[0]``. It shares
no code with ``pfunc.power``; both start from the same ``u`` values, taken from
pfunc's state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfunc as pf
from pfunc.parametrizations import SpectralNorm
from pfunc.tree import step_key


# ---------------------------------------------------------------------------------- BigGAN-PyTorch, transcribed
def ref_proj(x, y):
    """Projection of row vector x on row vector y."""
    return torch.mm(y, x.t()) * y / torch.mm(y, y.t())


def ref_gram_schmidt(x, ys):
    for y in ys:
        x = x - ref_proj(x, y)
    return x


def ref_power_iteration(W, u_list, update=True, eps=1e-12):
    us, vs, svs = [], [], []
    for i, u in enumerate(u_list):
        with torch.no_grad():
            v = torch.matmul(u, W)
            v = F.normalize(ref_gram_schmidt(v, vs), eps=eps)
            vs.append(v)
            u = torch.matmul(v, W.t())
            u = F.normalize(ref_gram_schmidt(u, us), eps=eps)
            us.append(u)
            if update:
                u_list[i][:] = u
        svs.append(torch.squeeze(torch.matmul(torch.matmul(v, W.t()), u.t())))
    return svs, us, vs


class RefSN:
    """BigGAN-PyTorch's ``SN`` mix-in: buffers ``u0..u{k-1}`` of shape (1, num_outputs) and ``sv0..``."""

    def sn_init(self, num_svs, num_itrs, num_outputs, transpose=False, eps=1e-12):
        self.num_itrs = num_itrs
        self.num_svs = num_svs
        self.transpose = transpose
        self.eps = eps
        for i in range(num_svs):
            self.register_buffer(f"u{i}", torch.randn(1, num_outputs, dtype=self.weight.dtype))
            self.register_buffer(f"sv{i}", torch.ones(1, dtype=self.weight.dtype))

    @property
    def u(self):
        return [getattr(self, f"u{i}") for i in range(self.num_svs)]

    @property
    def sv(self):
        return [getattr(self, f"sv{i}") for i in range(self.num_svs)]

    def W_(self):
        W_mat = self.weight.view(self.weight.size(0), -1)
        if self.transpose:
            W_mat = W_mat.t()
        for _ in range(self.num_itrs):
            svs, us, vs = ref_power_iteration(W_mat, self.u, update=self.training, eps=self.eps)
        if self.training:
            with torch.no_grad():
                for i, sv in enumerate(svs):
                    self.sv[i][:] = sv
        return self.weight / svs[0]


class RefSNLinear(nn.Linear, RefSN):
    def __init__(self, in_features, out_features, num_svs=1, num_itrs=1, transpose=False, eps=1e-12, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, dtype=dtype)
        rows = in_features if transpose else out_features
        self.sn_init(num_svs, num_itrs, rows, transpose=transpose, eps=eps)

    def forward(self, x):
        return F.linear(x, self.W_(), self.bias)


class RefSNConv2d(nn.Conv2d, RefSN):
    def __init__(self, in_channels, out_channels, kernel_size, num_svs=1, num_itrs=1, eps=1e-12, dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, padding=1, dtype=dtype)
        self.sn_init(num_svs, num_itrs, out_channels, eps=eps)

    def forward(self, x):
        return F.conv2d(x, self.W_(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class RefSNEmbedding(nn.Embedding, RefSN):
    def __init__(self, num_embeddings, embedding_dim, num_svs=1, num_itrs=1, eps=1e-12, dtype=None):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, dtype=dtype)
        self.sn_init(num_svs, num_itrs, num_embeddings, eps=eps)

    def forward(self, x):
        return F.embedding(x, self.W_())


# ---------------------------------------------------------------------------------- twins
def _twins(kind, num_svs, num_itrs, eps=1e-12, transpose=False, dtype=torch.float64, seed=0):
    """A pfunc net and BigGAN-PyTorch's layer with the same weight and the same initial ``u`` rows."""
    torch.manual_seed(seed)
    if kind == "linear":
        ref = RefSNLinear(7, 5, num_svs, num_itrs, transpose=transpose, eps=eps, dtype=dtype)
        plain = nn.Linear(7, 5, dtype=dtype)
        inputs = lambda g: (torch.randn(4, 7, generator=g, dtype=dtype),)
    elif kind == "conv2d":
        ref = RefSNConv2d(3, 6, 3, num_svs, num_itrs, eps=eps, dtype=dtype)
        plain = nn.Conv2d(3, 6, 3, padding=1, dtype=dtype)
        inputs = lambda g: (torch.randn(2, 3, 5, 5, generator=g, dtype=dtype),)
    elif kind == "embedding":
        ref = RefSNEmbedding(6, 4, num_svs, num_itrs, eps=eps, dtype=dtype)
        plain = nn.Embedding(6, 4, dtype=dtype)
        inputs = lambda g: (torch.randint(0, 6, (9,), generator=g),)
    else:  # pragma: no cover
        raise ValueError(kind)
    plain.load_state_dict({k: v for k, v in ref.state_dict().items() if k in plain.state_dict()})
    net = pf.parametrize(plain, {"weight": SpectralNorm.biggan(num_svs, num_itrs, transpose, eps)})
    params, state = net.init(generator=torch.Generator().manual_seed(seed + 1))
    u_key, sv_key = step_key("weight", 0, "u"), step_key("weight", 0, "sv")
    with torch.no_grad():
        for i in range(num_svs):
            ref.u[i].copy_(state[u_key][i : i + 1])
    return ref, net, params, state, inputs, u_key, sv_key


def _assert_same_state(ref, state, u_key, sv_key, **tol):
    torch.testing.assert_close(state[u_key], torch.cat(ref.u), **tol)
    torch.testing.assert_close(state[sv_key], torch.cat(ref.sv), **tol)


CASES = [
    ("linear", 1, 1, False),
    ("linear", 3, 1, False),
    ("linear", 2, 3, False),
    ("linear", 3, 2, True),
    ("conv2d", 1, 1, False),
    ("conv2d", 4, 2, False),
    ("embedding", 1, 1, False),
    ("embedding", 3, 2, False),
]


@pytest.mark.parametrize("kind,num_svs,num_itrs,transpose", CASES)
def test_training_steps_match_biggan_pytorch_outputs_grads_u_and_logged_sv(kind, num_svs, num_itrs, transpose):
    """Five training steps (forward, backward, an SGD update of the weight on both sides):
    same outputs, same weight gradients, same ``u`` and ``sv`` after each step."""
    ref, net, params, state, inputs, u_key, sv_key = _twins(kind, num_svs, num_itrs, transpose=transpose)
    ref.train()
    w_key = "parametrizations.weight.original"
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        args = inputs(g)
        out_ref = ref(*args)
        out, state = net(params, state, *args, training=True)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        _assert_same_state(ref, state, u_key, sv_key, rtol=1e-10, atol=1e-12)
        target = torch.randn(out.shape, generator=g, dtype=out.dtype)
        ref.zero_grad()
        ((out_ref - target) ** 2).sum().backward()
        (grad,) = torch.autograd.grad(((out - target) ** 2).sum(), [params[w_key]])
        torch.testing.assert_close(grad, ref.weight.grad, rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            ref.weight -= 0.05 * ref.weight.grad
            params[w_key] = (params[w_key] - 0.05 * grad).requires_grad_()


@pytest.mark.parametrize("kind,num_svs,num_itrs,transpose", CASES)
def test_eval_matches_biggan_pytorch_and_updates_neither_u_nor_sv(kind, num_svs, num_itrs, transpose):
    ref, net, params, state, inputs, u_key, sv_key = _twins(kind, num_svs, num_itrs, transpose=transpose)
    g = torch.Generator().manual_seed(3)
    ref.train()
    out, state = net(params, state, *inputs(g), training=True)  # move away from the initial u and sv
    ref(*inputs(torch.Generator().manual_seed(3)))
    kept = {k: v.clone() for k, v in state.items()}
    ref.eval()
    for _ in range(3):
        args = inputs(g)
        out_ref = ref(*args)
        out, new_state = net(params, state, *args, training=False)
        torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
        assert all(torch.equal(new_state[k], kept[k]) for k in kept)
        _assert_same_state(ref, new_state, u_key, sv_key, rtol=1e-10, atol=1e-12)


def test_float32_with_a_large_eps_matches_biggan_pytorch():
    """``eps`` is the floor of ``F.normalize``; a large one changes every vector, on both sides alike."""
    ref, net, params, state, inputs, u_key, sv_key = _twins("linear", 2, 2, eps=0.5, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        args = inputs(g)
        out_ref = ref(*args)
        out, state = net(params, state, *args, training=True)
        torch.testing.assert_close(out, out_ref)
        _assert_same_state(ref, state, u_key, sv_key)


def _with_spectrum(svals, h, w, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    k = len(svals)
    U, _ = torch.linalg.qr(torch.randn(h, k, generator=g, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(w, k, generator=g, dtype=dtype))
    return U @ torch.diag(torch.tensor(svals, dtype=dtype)) @ V.T


@pytest.mark.parametrize("num_svs", [1, 3, 5])
def test_logged_top_k_singular_values_converge_to_svdvals_as_in_biggan_pytorch(num_svs):
    """Training-mode calls on a fixed weight: pfunc's logged ``sv`` and BigGAN-PyTorch's both reach
    ``torch.linalg.svdvals(W)[:num_svs]`` (a spectral gap of 0.8 per value)."""
    W = _with_spectrum([5.0, 4.0, 3.2, 2.56, 2.05, 1.0, 0.5], 12, 9, seed=num_svs)
    u_key, sv_key = step_key("weight", 0, "u"), step_key("weight", 0, "sv")
    lin = nn.Linear(9, 12, dtype=torch.float64)
    ref_big = RefSNLinear(9, 12, num_svs, 1, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W)
        ref_big.weight.copy_(W)
    net = pf.parametrize(lin, {"weight": SpectralNorm.biggan(num_svs, 1)})
    params, state = net.init(generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for i in range(num_svs):
            ref_big.u[i].copy_(state[u_key][i : i + 1])
    ref_big.train()
    x = torch.randn(1, 9, dtype=torch.float64)
    for _ in range(300):
        _, state = net(params, state, x, training=True)
        ref_big(x)
    expected = torch.linalg.svdvals(W)[:num_svs]
    torch.testing.assert_close(state[sv_key], expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(torch.cat(ref_big.sv), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(state[u_key], torch.cat(ref_big.u), rtol=1e-8, atol=1e-10)
    values, _ = net.materialize(params, state, training=False)
    torch.testing.assert_close(torch.linalg.matrix_norm(values["weight"], ord=2), torch.tensor(1.0, dtype=W.dtype))


def test_num_itrs_in_one_call_equals_as_many_single_iteration_calls_in_training():
    """BigGAN-PyTorch's ``for _ in range(num_itrs)`` reuses the ``u`` it just wrote: k iterations in one
    training call are k calls of one iteration."""
    W = _with_spectrum([3.0, 2.0, 1.0], 8, 6, seed=0)
    lin = nn.Linear(6, 8, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(W)
    many = pf.parametrize(lin, {"weight": SpectralNorm.biggan(2, 4)})
    one = pf.parametrize(lin, {"weight": SpectralNorm.biggan(2, 1)})
    params, state = many.init(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 6, dtype=torch.float64)
    out_many, state_many = many(params, state, x, training=True)
    state_one = state
    for _ in range(4):
        out_one, state_one = one(params, state_one, x, training=True)
    torch.testing.assert_close(out_many, out_one, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state_many, state_one, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("num_svs", [1, 3])
def test_ensemble_training_call_equals_each_member_alone(num_svs):
    """The vmapped BigGAN iteration (one batched operation) gives each member what its solo call gives."""
    m = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    net = pf.parametrize(m, {"0.weight": SpectralNorm.biggan(num_svs, 2), "2.weight": SpectralNorm.biggan(num_svs, 1, transpose=True)})
    params, state = pf.ensemble.init(net, pf.ensemble.generators(0, 4))
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, new_state = pf.ensemble.call(net, params, state, x, training=True)
    for k in range(4):
        out_k, state_k = net({n: t[k] for n, t in params.items()}, {n: t[k] for n, t in state.items()}, x, training=True)
        torch.testing.assert_close(out[k], out_k, rtol=1e-10, atol=1e-12)
        for n in state_k:
            torch.testing.assert_close(new_state[n][k], state_k[n], rtol=1e-10, atol=1e-12)
