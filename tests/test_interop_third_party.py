"""Third-party models as they come (issue 17): torch's own parametrization machinery on their layers.

Hugging Face audio models register ``torch.nn.utils.parametrizations.weight_norm`` themselves (its
load hook is a local function), torch's pruning keeps masks out of ``state_dict`` and writes biases
from forward hooks, and most weight-normalised checkpoints were written by the deprecated
``torch.nn.utils.weight_norm``. Each test builds the real thing and checks pfunc against torch.
"""

import pickle

import pytest
import torch
from torch import nn

import pfunc as pf

from .third_party import (
    EncodecConv1d,
    Wav2Vec2PositionalConvEmbedding,
    old_weight_norm_checkpoint,
    structured_pruned_mlp,
    weight_norm_sparsified_mlp,
)


def _wav2vec2():
    torch.manual_seed(0)
    return Wav2Vec2PositionalConvEmbedding().eval()


# -- 1. pickling a converted model ---------------------------------------------------------------
@pytest.mark.parametrize("build", [_wav2vec2, lambda: EncodecConv1d().eval(), structured_pruned_mlp], ids=["wav2vec2", "encodec", "saliency_pruned"])
def test_a_net_converted_from_a_model_with_torch_hooks_pickles_and_computes_the_same(build):
    model = build()
    x = torch.randn(2, 5, 8) if isinstance(model, Wav2Vec2PositionalConvEmbedding) else (torch.randn(2, 2, 9) if isinstance(model, EncodecConv1d) else torch.randn(3, 6))
    net, params, state = pf.from_torch(model)
    again = pickle.loads(pickle.dumps(net))
    out, _ = net(params, state, x, training=False)
    torch.testing.assert_close(again(params, state, x, training=False)[0], out, rtol=0, atol=0)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)



# -- 2. to_torch keeps pruning masks -------------------------------------------------------------
@pytest.mark.parametrize("build", [weight_norm_sparsified_mlp, structured_pruned_mlp], ids=["WeightNormSparsifier", "SaliencyPruner"])
def test_to_torch_of_a_pruned_model_loads_its_masks_and_agrees_with_torch(build):
    model = build()
    net, params, state = pf.from_torch(model)
    masks = [k for k in state if k.endswith(".mask")]
    assert masks
    # a mask pfunc was handed (not the module's) must reach the twin
    state = {k: (torch.zeros_like(v) if k == masks[0] else v) for k, v in state.items()}
    twin = pf.to_torch(net, params, state)
    for k in masks:
        assert torch.equal(twin.get_buffer(k), state[k]), k
    x = torch.randn(3, model[0].in_features)
    torch.testing.assert_close(twin(x), net(params, state, x, training=False)[0], rtol=0, atol=0)


def test_to_torch_sets_non_persistent_buffers_from_state():
    net, params, state = pf.from_torch(EncodecConv1d())
    state = {**state, "stride": torch.tensor(1)}
    twin = pf.to_torch(net, params, state)
    assert int(twin.stride) == 1


# -- 4. old weight-norm checkpoints ----------------------------------------------------------------
def test_split_state_dict_reads_a_checkpoint_of_the_deprecated_weight_norm_as_torch_loads_it():
    model = _wav2vec2()
    net, _, _ = pf.from_torch(model)
    torch.manual_seed(1)
    plain = nn.Conv1d(8, 8, kernel_size=4, padding=2, groups=2)
    checkpoint = {f"conv.{k}": v for k, v in old_weight_norm_checkpoint(plain, dim=2).items()}
    assert "conv.weight_g" in checkpoint and "conv.weight_v" in checkpoint
    params, state = pf.split_state_dict(net, checkpoint)
    model.load_state_dict(checkpoint)  # torch's own route: its load hook renames the keys
    for k, v in model.state_dict().items():
        assert torch.equal((params | state)[k], v), k
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(net(params, state, x, training=False)[0], model(x), rtol=0, atol=0)


def test_split_state_dict_reads_old_weight_norm_keys_for_a_net_built_with_pfunc_weight_norm():
    net = pf.parametrize(nn.Linear(3, 2), {"weight": pf.parametrizations.WeightNorm()})
    checkpoint = old_weight_norm_checkpoint(nn.Linear(3, 2))
    params, _ = pf.split_state_dict(net, checkpoint)
    assert torch.equal(params["parametrizations.weight.original0"], checkpoint["weight_g"])
    assert torch.equal(params["parametrizations.weight.original1"], checkpoint["weight_v"])
    with pytest.raises(KeyError, match="unexpected keys \\['weight_g'\\]"):  # half a pair is not renamed
        pf.split_state_dict(net, {k: v for k, v in checkpoint.items() if k != "weight_v"})
