"""Tiny random-init models for tests and coverage benchmarks: transformers configs built in-process
(no download) plus hand-written modules that exercise concat, depthwise and grouped convolutions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], Any]  # seed -> example inputs (tuple or dict)


def _tokens(seed: int, vocab: int = 96, batch: int = 2, length: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def _pixels(seed: int, size: int = 32, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}


def _image(seed: int, size: int = 16, batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g),)


def _hf(model_cls: str, config_cls: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg).eval()

    return build


_DECODER = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 32), nn.Linear(32, 24), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 12)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class DenseBlockNet(nn.Module):
    """DenseNet-style: each layer's output is concatenated onto its input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(14), nn.Conv2d(14, 6, 3, padding=1)
        self.bn3, self.head = nn.BatchNorm2d(20), nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 3, h, w)
        x = self.stem(x)
        x = torch.cat([x, self.conv1(torch.relu(self.bn1(x)))], dim=1)  # (batch, 14, h, w)
        x = torch.cat([x, self.conv2(torch.relu(self.bn2(x)))], dim=1)  # (batch, 20, h, w)
        x = torch.relu(self.bn3(x)).mean(dim=(2, 3))  # (batch, 20)
        return self.head(x)


class GroupedConvNet(nn.Module):
    """Depthwise-separable and grouped convolutions with a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(24)
        self.proj = nn.Conv2d(24, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))  # (batch, 16, h, w)
        y = torch.relu(self.bn1(self.dw(s)))
        y = torch.relu(self.bn2(self.grouped(self.pw(y))))  # (batch, 24, h, w)
        y = self.proj(y) + s  # residual over the stem's channels
        return self.head(torch.flatten(self.pool(y), 1))


class UnknownOpNet(nn.Module):
    """An MLP whose middle goes through an op the registry has no rule for (``torch.fliplr``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 10), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 8)
        h = torch.relu(self.fc1(x))
        h = torch.fliplr(self.fc2(h))  # (batch, 12): no coupling rule
        return self.fc4(torch.relu(self.fc3(h)))


ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("llama", _hf("LlamaForCausalLM", "LlamaConfig", **_DECODER, num_key_value_heads=2, head_dim=16), _tokens),
    ZooEntry("mistral", _hf("MistralForCausalLM", "MistralConfig", **_DECODER, num_key_value_heads=2, head_dim=16),
             _tokens),
    ZooEntry("qwen2", _hf("Qwen2ForCausalLM", "Qwen2Config", **_DECODER, num_key_value_heads=2), _tokens),
    ZooEntry("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=96, n_embd=64, n_layer=2, n_head=4,
                         n_positions=32, bos_token_id=0, eos_token_id=0), _tokens),
    ZooEntry("opt", _hf("OPTForCausalLM", "OPTConfig", vocab_size=96, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=64), _tokens),
    ZooEntry("bert", _hf("BertModel", "BertConfig", vocab_size=96, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32), _tokens),
    ZooEntry("vit", _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=64,
                        intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_labels=5), _pixels),
    ZooEntry("resnet", _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32],
                           depths=[1, 1], num_labels=5), _pixels),
    ZooEntry("convnext", _hf("ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32],
                             depths=[1, 1], num_labels=5), _pixels),
    ZooEntry("mobilenet_v2", _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", image_size=32,
                                 depth_multiplier=0.35, num_labels=5), _pixels),
    ZooEntry("plain_mlp", PlainMLP, lambda seed: (torch.randn(3, 12, generator=torch.Generator().manual_seed(seed)),)),
    ZooEntry("densenet_block", DenseBlockNet, _image),
    ZooEntry("grouped_conv", GroupedConvNet, _image),
)


def build_eval(entry: ZooEntry) -> nn.Module:
    """Build with fixed seeds and give BatchNorm non-trivial running statistics and layer scales
    (ConvNeXt starts them at 1e-6, which would hide every block from an equivalence test)."""
    torch.manual_seed(0)
    model = entry.build()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.uniform_(0.5, 1.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model.eval()
