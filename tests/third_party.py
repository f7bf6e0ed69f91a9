"""Layers built as third-party models build them, with torch's own parametrization machinery on them.

transformers does not install beside the CPU torch here, so its layers are written out the way its
modelling code writes them (registering ``torch.nn.utils.parametrizations.weight_norm`` in their own
``__init__``); torch's pruning (``torch.ao.pruning``) ships with torch and is used as it is.

* :class:`Wav2Vec2PositionalConvEmbedding`: Wav2Vec2's (and HuBERT's) positional conv embedding: a
  grouped ``Conv1d`` with ``weight_norm(dim=2)``, "same" padding trimmed for an even kernel, GELU.
* :class:`Wav2Vec2Encoder`: that embedding inside the encoder path, with ``masked_spec_embed``, a
  parameter only a masked forward reaches.
* :class:`EncodecConv1d`: EnCodec's conv: ``weight_norm`` on a ``Conv1d`` and integer ``stride``,
  ``kernel_size`` and ``padding_total`` buffers (non-persistent) whose arithmetic decides the padding.
* :func:`structured_pruned_mlp`: an MLP prepared by ``torch.ao.pruning``'s ``SaliencyPruner``: a
  ``FakeStructuredSparsity`` parametrization (its mask kept out of ``state_dict``), the bias moved to
  ``_bias`` and added back by a forward hook that zeroes pruned entries through ``.data``.
* :func:`weight_norm_sparsified_mlp`: an MLP sparsified by ``WeightNormSparsifier`` (``FakeSparsity``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P


class Wav2Vec2PositionalConvEmbedding(nn.Module):
    def __init__(self, hidden_size: int = 8, num_conv_pos_embeddings: int = 4, num_conv_pos_embedding_groups: int = 2):
        super().__init__()
        self.conv = nn.Conv1d(
            hidden_size,
            hidden_size,
            kernel_size=num_conv_pos_embeddings,
            padding=num_conv_pos_embeddings // 2,
            groups=num_conv_pos_embedding_groups,
        )
        self.conv = P.weight_norm(self.conv, name="weight", dim=2)
        self.num_pad_remove = 1 if num_conv_pos_embeddings % 2 == 0 else 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.conv(hidden_states.transpose(1, 2))
        if self.num_pad_remove > 0:
            hidden_states = hidden_states[:, :, : -self.num_pad_remove]
        return F.gelu(hidden_states).transpose(1, 2)


class Wav2Vec2Encoder(nn.Module):
    """Wav2Vec2Model's path from features to hidden states: ``masked_spec_embed`` (a parameter the
    forward reads only when ``mask_time_indices`` is given, as in ``_mask_hidden_states``), the
    positional conv embedding added, layer norm, a projection. Without a mask ``masked_spec_embed``
    is unreached: ``loss.backward()`` leaves its ``.grad`` ``None``."""

    def __init__(self, hidden_size: int = 8):
        super().__init__()
        self.masked_spec_embed = nn.Parameter(torch.empty(hidden_size).uniform_())
        self.pos_conv_embed = Wav2Vec2PositionalConvEmbedding(hidden_size)
        self.layer_norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, 4)

    def forward(self, hidden_states: torch.Tensor, mask_time_indices: torch.Tensor | None = None) -> torch.Tensor:
        if mask_time_indices is not None:
            hidden_states = hidden_states.clone()
            hidden_states[mask_time_indices] = self.masked_spec_embed.to(hidden_states.dtype)
        hidden_states = hidden_states + self.pos_conv_embed(hidden_states)
        return self.proj(self.layer_norm(hidden_states))


class EncodecConv1d(nn.Module):
    def __init__(self, in_channels: int = 2, out_channels: int = 4, kernel_size: int = 3, stride: int = 2, dilation: int = 1):
        super().__init__()
        self.conv = P.weight_norm(nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation))
        kernel_size = self.conv.kernel_size[0]
        stride_t = torch.tensor(self.conv.stride[0], dtype=torch.int64)
        kernel_t = torch.tensor((kernel_size - 1) * self.conv.dilation[0] + 1, dtype=torch.int64)
        self.register_buffer("stride", stride_t, persistent=False)
        self.register_buffer("kernel_size", kernel_t, persistent=False)
        self.register_buffer("padding_total", kernel_t - stride_t, persistent=False)

    def _get_extra_padding_for_conv1d(self, hidden_states: torch.Tensor) -> torch.Tensor:
        length = hidden_states.shape[-1]
        n_frames = (length - self.kernel_size + self.padding_total) / self.stride + 1
        n_frames = torch.ceil(n_frames).to(torch.int64) - 1
        ideal_length = n_frames * self.stride + self.kernel_size - self.padding_total
        return ideal_length - length

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        extra_padding = self._get_extra_padding_for_conv1d(hidden_states)
        padding_right = self.padding_total // 2
        padding_left = self.padding_total - padding_right
        hidden_states = F.pad(hidden_states, (padding_left, padding_right + extra_padding))  # tensors, as transformers passes them
        return self.conv(hidden_states)


def structured_pruned_mlp(seed: int = 0) -> nn.Sequential:
    """``Linear(6, 8) - ReLU - Linear(8, 4)``, the first layer's rows pruned by ``SaliencyPruner`` (half)."""
    from torch.ao.pruning._experimental.pruner import SaliencyPruner

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    pruner = SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    pruner.step()
    return model


def weight_norm_sparsified_mlp(seed: int = 0) -> nn.Sequential:
    """``Linear(8, 8) - ReLU - Linear(8, 4)`` with both weights sparsified by ``WeightNormSparsifier``."""
    from torch.ao.pruning import WeightNormSparsifier

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    return model


def old_weight_norm_checkpoint(module: nn.Module, name: str = "weight", dim: int = 0) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of ``module`` with the deprecated ``torch.nn.utils.weight_norm`` applied
    (``<name>_g``, ``<name>_v`` keys), as most weight-normalised checkpoints in the wild were written."""
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = torch.nn.utils.weight_norm(copy.deepcopy(module), name, dim=dim)
    return {k: v.detach().clone() for k, v in old.state_dict().items()}


__all__ = [
    "Wav2Vec2PositionalConvEmbedding",
    "Wav2Vec2Encoder",
    "EncodecConv1d",
    "structured_pruned_mlp",
    "weight_norm_sparsified_mlp",
    "old_weight_norm_checkpoint",
]
