"""Device mesh (dp x cp), sequence sharding and context-parallel attention."""
from dcwdist.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
