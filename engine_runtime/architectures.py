"""Built-in model architectures with fixed random weights, for demos and benchmarks.

torchvision's ResNets are rebuilt here layer for layer (same parameter count and
shapes) because PyPI's torchvision does not import beside the CPU build of torch
(``operator torchvision::nms does not exist``). When torchvision imports, any of its
architectures can be used; the built-ins are used otherwise. ``bert-base`` is a
BERT-base-sized transformer encoder (12 layers, hidden 768, sequence 128).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "BuiltinModel",
    "Encoder",
    "PoolLinear",
    "ResNet",
    "build",
]


logger = logging.getLogger(__name__)


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages = []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PoolLinear(nn.Module):
    """ResNet's input and output, almost none of its work: a global average pool and one
    linear layer. For measuring the serving path itself (a ResNet-50-sized request, 600 KB
    at 224 px, answered in microseconds), as Triton's own tests use identity models."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.fc = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class Encoder(nn.Module):
    """A BERT-shaped encoder: token + position embeddings, post-norm layers, pooled output."""

    def __init__(self, vocab: int = 30522, hidden: int = 768, layers: int = 12, heads: int = 12,
                 ffn: int = 3072, max_len: int = 512) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = nn.Linear(hidden, hidden)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.norm(self.tok(input_ids) + self.pos(positions))
        x = self.encoder(x)
        return torch.tanh(self.pool(x[:, 0]))


@dataclass(frozen=True)
class BuiltinModel:
    module: nn.Module
    input_name: str
    input_dtype: str
    #: Shape of one sample (without the batch dimension).
    sample_shape: tuple[int, ...]
    output_name: str
    output_shape: tuple[int, ...]
    #: The values an integer input may take (token ids: below the vocabulary size); None: any.
    input_range: tuple[int, int] | None = None


_RESNETS = {
    "resnet18": (_Basic, [2, 2, 2, 2]),
    "resnet34": (_Basic, [3, 4, 6, 3]),
    "resnet50": (_Bottleneck, [3, 4, 6, 3]),
    "resnet101": (_Bottleneck, [3, 4, 23, 3]),
    "resnet152": (_Bottleneck, [3, 8, 36, 3]),
}
_ENCODERS = {"bert-base": dict(), "bert-tiny": dict(hidden=128, layers=2, heads=2, ffn=512)}
_PROBES = {"pool-linear": PoolLinear}

ARCHITECTURES = tuple(_RESNETS) + tuple(_ENCODERS) + tuple(_PROBES)


def build(arch: str, *, seed: int = 0, image_size: int = 224, seq_len: int = 128) -> BuiltinModel:
    """An architecture with fixed random weights (``seed``), in eval mode, on the CPU."""
    torch.manual_seed(seed)
    if arch in _RESNETS:
        block, layers = _RESNETS[arch]
        module: nn.Module = ResNet(block, layers)
        spec = ("input", "float32", (3, image_size, image_size), "output", (1000,))
    elif arch in _PROBES:
        module = _PROBES[arch]()
        spec = ("input", "float32", (3, image_size, image_size), "output", (1000,))
    elif arch in _ENCODERS:
        module = Encoder(**_ENCODERS[arch])
        spec = ("input_ids", "int64", (seq_len,), "output", (module.pool.out_features,))
    else:
        module = _torchvision(arch)
        spec = ("input", "float32", (3, image_size, image_size), "output", (1000,))
    module.eval()
    input_range = (0, module.tok.num_embeddings - 1) if isinstance(module, Encoder) else None
    return BuiltinModel(module, *spec, input_range=input_range)


def _torchvision(arch: str) -> nn.Module:
    try:
        import torchvision
    except Exception as err:  # noqa: BLE001 - PyPI torchvision fails with RuntimeError beside CPU torch
        raise ValueError(
            f"unknown architecture {arch!r}: built-in ones are {list(ARCHITECTURES)}, "
            f"and torchvision is not importable here ({err})"
        ) from err
    try:
        return torchvision.models.get_model(arch, weights=None)
    except ValueError as err:
        raise ValueError(f"unknown architecture {arch!r}: not built in ({list(ARCHITECTURES)}) "
                         f"and not a torchvision model") from err
