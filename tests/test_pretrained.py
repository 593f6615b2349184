"""The cached pretrained backbone is a function of its settings (the cache key),
not of the caller's random state."""

import pytest
import torch

from fastmdl.data.sources import SourceMissing
from fastmdl.pretrained import pretrained_backbone

TINY = dict(size=16, width=0.25, epochs=1, max_train=64, batch_size=32, progress=False)


def test_the_backbone_does_not_depend_on_the_callers_random_state(tmp_path):
    models = []
    for i, caller_seed in enumerate((1, 2)):
        torch.manual_seed(caller_seed)
        try:
            model, info = pretrained_backbone(seed=0, directory=str(tmp_path / str(i)), **TINY)
        except SourceMissing as e:
            pytest.skip(f"Fashion-MNIST is not installed: {e}")
        assert not info["reused"]
        models.append(model)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)
