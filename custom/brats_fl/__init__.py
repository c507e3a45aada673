"""brats-fl: federated 3D brain-tumour segmentation with NVIDIA FLARE and MONAI.

The package is laid out in layers, in the order data flows, each importing only its own and those below
(``tests/test_layers.py``): ``protocol`` (shared names), ``settings`` (parameter schema, numerics) and ``version`` ->
``data`` (BraTS files, checks, phantom, partitions) -> ``seg`` (FLARE-free model, losses, metrics, trainer,
inference) -> ``site`` (the FLARE task loop), ``transfer`` (filters on the wire) and ``drills`` (fault and slow-site
drills) -> ``server`` (controllers, aggregators, screening) and ``ops`` (POC, provisioning) -> ``jobs`` (registry,
recipes, export, simulation) -> ``results`` (tables, figures, reports, benchmark) -> ``cli``.
"""

__version__ = "0.2.0"
