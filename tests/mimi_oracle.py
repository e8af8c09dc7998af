"""transformers' MimiModel as the test oracle: small random codecs, saved in the published format.

Random weights are spread wider than transformers' init (which starts layer scales at 0.01, codebooks
at zero and projections tiny), so every part of the model visibly shapes the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def random_oracle(directory: Path, seed: int = 0, **overrides: Any):
    """A transformers MimiModel with random weights, saved (config.json + model.safetensors) in `directory`."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(seed)
    model = MimiModel(MimiConfig(**overrides)).eval()
    with torch.no_grad():
        spread(model.state_dict())
    model.save_pretrained(directory)
    return model


def spread(tensors: Mapping[str, torch.Tensor]) -> None:
    """Redraw in place (global RNG) the weights transformers' init leaves near-inert; names as published."""
    for name, tensor in tensors.items():
        if name.endswith("layer_scale.scale"):
            tensor.uniform_(0.3, 1.0)
        elif "layernorm" in name:
            tensor.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
        elif name.endswith("embed_sum"):
            tensor.normal_(0.0, 1.0)
        elif name.endswith("cluster_usage"):
            tensor.uniform_(0.5, 4.0)
        elif name.endswith(("proj.weight", "fc1.weight", "fc2.weight")):
            tensor.normal_(0.0, tensor[0].numel() ** -0.5)
        elif "transformer" in name and name.endswith("bias"):
            tensor.normal_(0.0, 0.1)
