"""fedbrats: federated brain tumour segmentation with missing MRI sequences (NVIDIA FLARE + MONAI)."""

__version__ = "0.1.0"
