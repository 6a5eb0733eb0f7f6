"""Data: tokenizers, packing, deterministic row streams, synthetic DCW documents."""
from dcwdist.data_pipelines.config import DataConfig
from dcwdist.data_pipelines.packing import IGNORE, Batch, pack_row
from dcwdist.data_pipelines.stream import SyntheticRows

__all__ = ["DataConfig", "Batch", "IGNORE", "pack_row", "SyntheticRows"]
