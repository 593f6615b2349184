"""Data for multi-domain experiments.

- :func:`builtin_benchmark`: four real-image domains available offline
  (Fashion-MNIST, scikit-learn digits, scikit-image faces and textures).
- :func:`decathlon_domain` and :func:`image_folder_domain`: readers for the
  Visual Decathlon devkit and ImageFolder-style trees (ImageNet-to-Sketch);
  ``preprocess="devkit"`` gives the Decathlon papers' crops, flips and per-domain
  statistics (:func:`load_mean_std` reads the devkit's pickle without running it).
"""

from .benchmark import DOMAINS, Domain, MultiDomainData, builtin_benchmark, resize
from .readers import (NO_FLIP, DevkitEval, DevkitTrain, ImageFiles, decathlon_benchmark,
                      decathlon_domain, image_folder_benchmark, image_folder_domain,
                      load_mean_std)
from .sources import SourceMissing

__all__ = ["DOMAINS", "Domain", "MultiDomainData", "builtin_benchmark", "resize",
           "SourceMissing", "ImageFiles", "decathlon_domain", "decathlon_benchmark",
           "image_folder_domain", "image_folder_benchmark", "DevkitTrain", "DevkitEval",
           "NO_FLIP", "load_mean_std"]
