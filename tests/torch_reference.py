"""PyTorch reference models for the conversion tests and the benchmark (test-only code).

`BagNetReference` follows the published BagNet architecture (Brendel & Bethge 2019, Sec. 3 and
the official bethgelab `bagnets/pytorchnet.py` state_dict layout): a ResNet-50 variant whose
convolutions are all unpadded and whose 3x3 convolutions are replaced by 1x1 ones beyond a
per-stage count, so the receptive field stays 9, 17 or 33 px at stride 8.
`ResNet50Reference` is a torchvision-equivalent ResNet-50 (v1.5, stride on the 3x3 conv) with the
exact torchvision state_dict key names; torchvision itself is not a dependency.

One deliberate difference from the official BagNet code: it averages with
`nn.AvgPool2d(x.size(2), stride=1)`, which raises on a non-square feature map; here the image logits are the
true mean over all spatial locations, which equals the official result on square inputs.
"""
from __future__ import annotations

import torch
from torch import nn

STAGE_PLANES = (64, 128, 256, 512)
STAGE_BLOCKS = (3, 4, 6, 3)
BAGNET_STRIDES = (2, 2, 2, 1)
RESNET_STRIDES = (1, 2, 2, 2)
# Number of leading blocks per stage whose conv2 is 3x3 (BagNet paper Sec. 3; rf 9 / 17 / 33).
BAGNET_KERNEL3 = {
    "bagnet9": (1, 1, 0, 0),
    "bagnet17": (1, 1, 1, 0),
    "bagnet33": (1, 1, 1, 1),
}
EXPANSION = 4


class Bottleneck(nn.Module):
    """ResNet bottleneck; `padding` is 0 for BagNets (residual cropped) and 1 for ResNet-50."""

    def __init__(self, inplanes: int, planes: int, stride: int, kernel_size: int,
                 padding: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        # BagNet: unpadded convs shrink the main path; keep the top-left part of the residual.
        residual = residual[:, :, : out.shape[2], : out.shape[3]]
        return self.relu(out + residual)


def _make_stages(module: nn.Module, kernel3: tuple[int, ...], strides: tuple[int, ...],
                 padding: int) -> None:
    inplanes = 64
    for s, (planes, blocks, stride, k3) in enumerate(zip(STAGE_PLANES, STAGE_BLOCKS, strides, kernel3)):
        layers = []
        for i in range(blocks):
            block_stride = stride if i == 0 else 1
            downsample = None
            if i == 0 and (block_stride != 1 or inplanes != planes * EXPANSION):
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=block_stride, bias=False),
                    nn.BatchNorm2d(planes * EXPANSION),
                )
            kernel = 3 if i < k3 else 1
            layers.append(Bottleneck(inplanes, planes, block_stride, kernel,
                                     padding if kernel == 3 else 0, downsample))
            inplanes = planes * EXPANSION
        setattr(module, f"layer{s + 1}", nn.Sequential(*layers))


class BagNetReference(nn.Module):
    """BagNet-9/17/33 in the official state_dict layout (BagNet paper Sec. 3, Fig. 1)."""

    def __init__(self, name: str, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 1, bias=False)
        self.conv2 = nn.Conv2d(64, 64, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64, momentum=0.001)
        self.relu = nn.ReLU(inplace=True)
        _make_stages(self, BAGNET_KERNEL3[name], BAGNET_STRIDES, padding=0)  # block BNs: momentum 0.1
        self.fc = nn.Linear(512 * EXPANSION, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv2(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-location logits (B, H', W', C): the linear head applied before the spatial mean."""
        return self.fc(self.features(x).permute(0, 2, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class ResNet50Reference(nn.Module):
    """torchvision-equivalent ResNet-50 (He et al. 2016, Table 1; v1.5 stride on the 3x3 conv)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        _make_stages(self, STAGE_BLOCKS, RESNET_STRIDES, padding=1)  # all conv2 3x3
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * EXPANSION, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
    return model


def build_reference(name: str, num_classes: int, seed: int = 0) -> nn.Module:
    """A random-weight reference model in eval mode (`bagnet9/17/33` or `resnet50`)."""
    torch.manual_seed(seed)
    if name == "resnet50":
        model = ResNet50Reference(num_classes)
    elif name in BAGNET_KERNEL3:
        model = BagNetReference(name, num_classes)
    else:
        raise ValueError(f"unknown reference model {name!r}; use one of bagnet9, bagnet17, bagnet33, resnet50")
    return randomize_batchnorm(model, seed + 1).eval()
