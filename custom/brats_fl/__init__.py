"""brats-fl: federated 3D brain-tumour segmentation with NVIDIA FLARE and MONAI.

The package is laid out in the order data flows: ``data`` (BraTS files, checks, phantom, partitions) ->
``seg`` (FLARE-free model, losses, metrics, trainer, inference) -> ``site`` (the FLARE task loop) -> ``server``
(controllers, aggregators, screening) -> ``transfer`` (filters on the wire) -> ``jobs`` (parameters, catalogue,
export) -> ``results`` (tables, figures, reports) -> ``ops`` (POC, provisioning) -> ``cli``. ``drills`` holds
the fault and slow-site drills used by tests and benchmarks.
"""

__version__ = "0.2.0"
