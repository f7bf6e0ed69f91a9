"""The DDPM Unet through pfunc: shapes, options, self-conditioning, and weight standardization
as a parametrization (same outputs and gradients as denoising-diffusion-pytorch's WeightStandardizedConv2d)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pfunc as pf
from examples.diffusion.unet import (
    Attention,
    Block,
    LAYOUTS,
    Downsample,
    LayerNorm,
    LinearAttention,
    RMSNorm,
    RandomOrLearnedSinusoidalPosEmb,
    SinusoidalPosEmb,
    Unet,
    parametrize_unet,
    weight_standardization_spec,
)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


TINY = dict(dim=8, dim_mults=(1, 2), channels=1, resnet_block_groups=4, attn_heads=2, attn_dim_head=8)


def tiny_unet(**kw):
    torch.manual_seed(0)
    return Unet(**{**TINY, **kw})


class SeedWeightStandardizedConv2d(nn.Conv2d):
    """denoising-diffusion-pytorch's layer, transcribed (einops reduce -> torch): the reference pfunc must match."""

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        var = weight.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        normalized_weight = (weight - mean) * (var + eps).rsqrt()
        return F.conv2d(x, normalized_weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def seed_style_twin(unet: Unet) -> Unet:
    """A deep copy whose Block convs are denoising-diffusion-pytorch's WeightStandardizedConv2d (same weights)."""
    twin = copy.deepcopy(unet)
    for m in twin.modules():
        if isinstance(m, Block):
            old = m.proj
            new = SeedWeightStandardizedConv2d(old.in_channels, old.out_channels, 3, padding=1)
            new.load_state_dict(old.state_dict())
            m.proj = new
    return twin


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"self_condition": True},
        {"learned_variance": True},
        {"learned_sinusoidal_cond": True},
        {"random_fourier_features": True},
        {"dim_mults": (1, 2, 4), "init_dim": 12},
    ],
    ids=["plain", "self_condition", "learned_variance", "learned_sinusoidal", "random_fourier", "three_levels_init_dim"],
)
def test_unet_output_shape_for_every_option(options):
    unet = tiny_unet(**options)
    net = parametrize_unet(unet)
    params, state = net.init()
    size = 8 * unet.downsample_factor // 2 * 2
    x = torch.randn(3, 1, size, size)
    out, _ = net(params, state, x, torch.tensor([0.0, 10.0, 999.0]), training=True)
    expected_channels = 2 if options.get("learned_variance") else 1
    assert out.shape == (3, expected_channels, size, size)
    assert torch.isfinite(out).all()


def test_random_fourier_weights_are_state_and_learned_ones_are_params():
    rand = parametrize_unet(tiny_unet(random_fourier_features=True))
    learned = parametrize_unet(tiny_unet(learned_sinusoidal_cond=True))
    assert "time_mlp.0.weights" in rand.init()[1] and "time_mlp.0.weights" not in rand.init()[0]
    assert "time_mlp.0.weights" in learned.init()[0]


def test_time_embeddings_shapes_and_values():
    t = torch.tensor([0.0, 1.0, 500.0])
    emb = SinusoidalPosEmb(8)(t)
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.cat([torch.zeros(4), torch.ones(4)]))  # sin(0), cos(0)
    rff = RandomOrLearnedSinusoidalPosEmb(6, is_random=True)(t)
    assert rff.shape == (3, 7) and torch.equal(rff[:, 0], t)


def test_self_conditioning_input_changes_the_output_and_none_means_zeros():
    net = parametrize_unet(tiny_unet(self_condition=True))
    params, state = net.init()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 50.0])
    cond = torch.randn(2, 1, 8, 8)
    none, _ = net(params, state, x, t, None)
    zeros, _ = net(params, state, x, t, torch.zeros_like(x))
    with_cond, _ = net(params, state, x, t, cond)
    assert torch.equal(none, zeros)
    assert not torch.allclose(with_cond, none)


def test_every_block_conv_is_weight_standardized_and_nothing_else():
    unet = tiny_unet()
    spec = weight_standardization_spec(unet)
    blocks = [n for n, m in unet.named_modules() if isinstance(m, Block)]
    assert sorted(spec) == sorted(f"{n}.proj.weight" for n in blocks)
    assert len(spec) == 2 * 2 * 4 + 2 * 2 + 2  # downs, ups (2 ResnetBlocks x 2 Blocks per level), mid, final
    net = parametrize_unet(unet)
    assert set(net.chains) == set(spec)
    assert all(isinstance(m.proj, nn.Conv2d) and type(m.proj) is nn.Conv2d for m in unet.modules() if isinstance(m, Block))
    assert not pf.is_parametrized(unet)  # the module itself is untouched


@pytest.mark.parametrize("self_condition", [False, True])
def test_parametrized_unet_matches_seed_weight_standardized_conv_in_output_and_gradients(self_condition):
    unet = tiny_unet(self_condition=self_condition)
    twin = seed_style_twin(unet)
    net = parametrize_unet(unet)
    params, state = net.init()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    cond = torch.randn_like(x) if self_condition else None

    def loss_fn(p):
        out, _ = net(p, state, x, t, cond, training=True)
        return out.square().mean(), out

    grads, (loss, out) = torch.func.grad_and_value(loss_fn, has_aux=True)(params)
    ref_out = twin(x, t, cond)
    ref_out.square().mean().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    ref_grads = dict(twin.named_parameters())
    for name in params:
        plain = name.replace("parametrizations.", "").replace(".original", "")
        torch.testing.assert_close(grads[name], ref_grads[plain].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_flows_through_the_standardization_to_the_raw_weight():
    net = parametrize_unet(tiny_unet())
    params, state = net.init()
    key = "downs.0.0.block1.proj.parametrizations.weight.original"
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    grads = torch.func.grad(lambda p: net(p, state, x, t)[0].sum())(params)
    g = grads[key]
    # standardization is invariant to shifting each output filter (exactly) and to scaling it
    # (up to eps): the raw weight's gradient is orthogonal to both directions, per output channel
    W = params[key].detach()
    centered = W - W.mean(dim=(1, 2, 3), keepdim=True)
    assert g.abs().sum() > 0
    torch.testing.assert_close(g.sum(dim=(1, 2, 3)), torch.zeros(g.shape[0]), atol=1e-5, rtol=0)
    cosine = F.cosine_similarity(g.flatten(1), centered.flatten(1), dim=1)
    assert cosine.abs().max() < 0.05


def test_downsample_is_the_seeds_rearrange_then_conv():
    torch.manual_seed(0)
    down = Downsample(2, 3)
    x = torch.randn(1, 2, 4, 4)
    b, c, h, w = x.shape
    # einops 'b c (h p1) (w p2) -> b (c p1 p2) h w', p1 = p2 = 2, written out by hand
    rearranged = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    torch.testing.assert_close(down(x), down[1](rearranged))


def test_attention_layers_preserve_shape_and_full_attention_is_permutation_equivariant():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    assert LinearAttention(8, heads=2, dim_head=4)(x).shape == x.shape
    attn = Attention(8, heads=2, dim_head=4)
    perm = torch.randperm(16)
    flat = x.flatten(2)
    y = attn(x).flatten(2)[:, :, perm]
    y_perm = attn(flat[:, :, perm].reshape(2, 8, 4, 4)).flatten(2)
    torch.testing.assert_close(y, y_perm, rtol=1e-5, atol=1e-6)


def test_bad_unet_arguments_are_refused_with_the_name():
    with pytest.raises(ValueError, match="groups"):
        Block(4, 6, groups=4)
    with pytest.raises(ValueError, match="dim"):
        SinusoidalPosEmb(5)


# ------------------------------------------------------------------------------ the two layouts
def layout_unet(layout: str, **kw) -> tuple[Unet, pf.Parametrized]:
    options = dict(LAYOUTS[layout])
    weight_standardization = options.pop("weight_standardization")
    torch.manual_seed(0)
    unet = Unet(**{**TINY, **options, **kw})
    return unet, parametrize_unet(unet, weight_standardization)


def test_the_modern_layout_has_rmsnorm_memory_key_values_full_attention_innermost_and_plain_convs():
    unet, net = layout_unet("modern")
    assert not any(isinstance(m, (nn.GroupNorm, LayerNorm)) for m in unet.modules())
    assert all(isinstance(m.norm, RMSNorm) for m in unet.modules() if isinstance(m, Block))
    assert net.chains == {}                                       # no weight standardization
    # the innermost level's attention is full attention, down and up; the others linear
    assert isinstance(unet.downs[-1][2].fn.fn, Attention) and isinstance(unet.ups[0][2].fn.fn, Attention)
    assert isinstance(unet.downs[0][2].fn.fn, LinearAttention) and not unet.downs[0][2].fn.fn.scale_values
    assert unet.downs[0][2].fn.fn.mem_kv.shape == (2, 2, 8, 4)    # [2, heads, dim_head, memories]
    assert unet.mid_attn.fn.fn.mem_kv.shape == (2, 2, 4, 8)       # [2, heads, memories, dim_head]
    params, state = net.init()
    out, _ = net(params, state, torch.randn(3, 1, 8, 8), torch.tensor([0.0, 10.0, 999.0]), training=True)
    assert out.shape == (3, 1, 8, 8) and bool(torch.isfinite(out).all())


def test_the_classic_layout_is_the_default_unet():
    default, _ = layout_unet("classic")
    torch.manual_seed(0)
    plain = Unet(**TINY)
    assert sorted(default.state_dict()) == sorted(plain.state_dict())
    assert all(torch.equal(default.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_rmsnorm_is_unit_rms_times_the_gain():
    norm = RMSNorm(6)
    with torch.no_grad():
        norm.g.copy_(torch.arange(1.0, 7.0).reshape(1, 6, 1, 1))
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    expected = x / x.pow(2).mean(dim=1, keepdim=True).sqrt() * norm.g.double()
    torch.testing.assert_close(norm.double()(x), expected)


def test_full_attention_with_memory_equals_attention_over_memory_and_pixels():
    torch.manual_seed(0)
    layer = Attention(6, heads=2, dim_head=4, num_mem_kv=3)
    x = torch.randn(2, 6, 3, 3)
    q, k, v = (t.reshape(2, 2, 4, 9).transpose(-1, -2) for t in layer.to_qkv(x).chunk(3, dim=1))  # [B, h, n, d]
    memory_k, memory_v = (m.expand(2, *m.shape) for m in layer.mem_kv)
    out = F.scaled_dot_product_attention(q, torch.cat((memory_k, k), dim=-2), torch.cat((memory_v, v), dim=-2))
    expected = layer.to_out(out.transpose(-1, -2).reshape(2, 8, 3, 3))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_linear_attention_with_memory_attends_to_the_memories_as_extra_positions():
    torch.manual_seed(0)
    layer = LinearAttention(6, heads=2, dim_head=4, num_mem_kv=3, scale_values=False, norm="rmsnorm")
    x = torch.randn(2, 6, 3, 3)
    q, k, v = (t.reshape(2, 2, 4, 9) for t in layer.to_qkv(x).chunk(3, dim=1))                  # [B, h, d, n]
    k = torch.cat((layer.mem_kv[0].expand(2, -1, -1, -1), k), dim=-1).softmax(dim=-1)
    v = torch.cat((layer.mem_kv[1].expand(2, -1, -1, -1), v), dim=-1)
    q = q.softmax(dim=-2) * 4**-0.5
    out = torch.einsum("bhde,bhdn->bhen", torch.einsum("bhdn,bhen->bhde", k, v), q)
    torch.testing.assert_close(layer(x), layer.to_out(out.reshape(2, 8, 3, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option, value, message", [
    ("block_norm", "batchnorm", "Unet: block_norm must be 'groupnorm' or 'rmsnorm', got 'batchnorm'"),
    ("attn_norm", "groupnorm", "Unet: attn_norm must be 'layernorm' or 'rmsnorm', got 'groupnorm'"),
    ("num_mem_kv", -1, "Unet: num_mem_kv must be a non-negative integer, got -1"),
    ("num_mem_kv", 2.5, "Unet: num_mem_kv must be a non-negative integer, got 2.5"),
])
def test_a_bad_layout_option_is_refused_naming_it(option, value, message):
    with pytest.raises(ValueError) as e:
        Unet(**TINY, **{option: value})
    assert str(e.value) == message


def test_the_modern_layout_ignores_group_counts_that_groupnorm_would_refuse():
    unet, net = layout_unet("modern", resnet_block_groups=3)      # 8 channels are not 3 groups: fine without GroupNorm
    params, state = net.init()
    assert net(params, state, torch.randn(1, 1, 8, 8), torch.tensor([5.0]), training=True)[0].shape == (1, 1, 8, 8)


def test_a_block_refuses_a_norm_it_does_not_have_naming_it():
    with pytest.raises(ValueError, match="Block: norm must be 'groupnorm' or 'rmsnorm', got 'layernorm'"):
        Block(4, 8, norm="layernorm")            # an attention norm, not a block's
