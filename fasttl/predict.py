"""`fasttl predict`: top-5 ImageNet classes of images, to check that a backbone's weights loaded."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from fasttl import backbones
from fasttl.data.spec import TransformSpec
from fasttl.data.torch_pipeline import decode, transform


@torch.no_grad()
def predict(paths: Sequence[str], backbone_name: str = backbones.DEFAULT, weights: Optional[str] = None,
            top: int = 5) -> List[List[Tuple[str, float]]]:
    model = backbones.create(backbone_name, weights=weights).eval()
    spec = TransformSpec.for_backbone(model.preprocessing)
    batch = torch.stack([transform(decode(p), spec) for p in paths])
    probabilities = model(batch).softmax(-1)
    names = backbones.imagenet_classes()
    values, indices = probabilities.topk(top, dim=-1)
    return [[(names[i], float(v)) for v, i in zip(vs.tolist(), ids.tolist())] for vs, ids in zip(values, indices)]


def format_predictions(paths: Sequence[str], predictions) -> str:
    lines = []
    for path, preds in zip(paths, predictions):
        lines.append(path)
        lines += [f"  {prob:6.1%}  {name}" for name, prob in preds]
    return "\n".join(lines)
