"""megatron_align: alignment pretraining on NVIDIA Megatron-Core.

Importing the package is cheap and needs none of the optional GPU stack
(Transformer Engine, apex, DALI, NVML, mlflow); see ``megatron_align.optional``.
"""

__version__ = "0.1.0"
