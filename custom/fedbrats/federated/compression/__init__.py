"""SVD-compressed model updates: the codec (:mod:`.codec`) and the NVFlare filters any job can switch on
(:mod:`.filters`). Job configurations name the filters here, as ``fedbrats.federated.compression.<Filter>``."""

from fedbrats.federated.compression.filters import SVDBroadcastCompressor, SVDDecompressor, SVDUpdateCompressor

__all__ = ["SVDBroadcastCompressor", "SVDDecompressor", "SVDUpdateCompressor"]
