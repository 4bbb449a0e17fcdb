"""fedbrats: federated brain tumour segmentation with missing MRI sequences (NVIDIA FLARE + MONAI)."""

from fedbrats import _moved

__version__ = "0.1.0"

# Jobs and exported model folders written before the code moved name modules by their old paths.
_moved.install()
