"""Small versions of the third-party models pfunc must run unchanged (torchvision and timm are not
installable beside the CPU torch here, so their building blocks are written out).

* :class:`ResNet`: torchvision's ResNet layout (BasicBlock, BatchNorm, a 1x1 downsample, kaiming
  fan-out init), freshly built and so in train mode.
* :class:`MobileNetBlock`: depthwise-separable conv with BatchNorm and ReLU6, and dropout.
* :class:`WindowAttention`: timm's Swin attention, with its non-persistent ``relative_position_index``.
* :class:`Sphere`: a geotorch-style constraint: a torch parametrization with a non-persistent
  buffer whose ``right_inverse`` and ``sample`` draw from the global RNG.
* :class:`AssignedRunningMean`: a hand-written norm that *assigns* its running mean
  (``self.running_mean = new``) instead of updating it in place, as EMA modules do.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet, two stages of one BasicBlock each."""

    def __init__(self, num_classes: int = 5, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MobileNetBlock(nn.Module):
    def __init__(self, cin: int = 3, cout: int = 8, p: float = 0.2):
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(cout, 2)

    def forward(self, x):
        x = self.pw(self.dw(x)).mean((2, 3))
        return self.head(self.drop(x))


class WindowAttention(nn.Module):
    """timm's Swin window attention: a relative position bias table indexed by a non-persistent buffer."""

    def __init__(self, dim: int = 8, window: int = 2, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, window*window, dim)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5 + bias
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


class Sphere(nn.Module):
    """geotorch's ``Sphere``: unit-norm rows; a non-persistent ``_reference`` buffer; ``right_inverse``
    and ``sample`` draw from the global RNG."""

    def __init__(self, size: tuple[int, ...]):
        super().__init__()
        self.register_buffer("_reference", torch.empty(0), persistent=False)
        self.size = size

    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)

    def right_inverse(self, x):
        return x + 1e-3 * torch.randn_like(x)  # geotorch perturbs to leave the singular set

    def sample(self):
        return self.forward(torch.randn(self.size))


class AssignedRunningMean(nn.Module):
    """A hand-written norm that assigns its running mean, as EMA modules do."""

    def __init__(self, n: int = 4, momentum: float = 0.5):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(n))
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        if self.training:
            self.running_mean = (1 - self.momentum) * self.running_mean + self.momentum * x.mean(0).detach()
            return self.lin(x - x.mean(0))
        return self.lin(x - self.running_mean)


def torch_forward(model: nn.Module, values: dict, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, dict]:
    """The reference: a deep copy of ``model`` loaded with ``values``, run in ``training`` mode the plain
    torch way; returns its output and every buffer afterwards."""
    import copy

    twin = copy.deepcopy(model).train(training)
    with torch.no_grad():
        for name, t in [*twin.named_parameters(), *twin.named_buffers()]:
            t.copy_(values[name])
    out = twin(x)
    return out, {k: v.detach().clone() for k, v in twin.named_buffers()}


def fingerprint(tree: dict) -> dict:
    """Every tensor of ``tree`` as (object id, version, a copy of its data), to show nothing was written."""
    return {k: (id(t), t._version, t.detach().clone()) for k, t in tree.items()}


def assert_unwritten(tree: dict, before: dict) -> None:
    assert tree.keys() == before.keys()
    for k, t in tree.items():
        tid, _version, data = before[k]
        assert id(t) == tid, k
        assert torch.equal(t.detach(), data), f"{k} was written"


def conv_input(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1))


__all__ = [
    "ResNet",
    "MobileNetBlock",
    "WindowAttention",
    "Sphere",
    "AssignedRunningMean",
    "torch_forward",
    "fingerprint",
    "assert_unwritten",
    "conv_input",
]
