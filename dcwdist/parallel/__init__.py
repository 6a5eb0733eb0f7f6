"""Device mesh (dp x cp), rank discovery, sequence sharding and context-parallel attention."""
from dcwdist.parallel.config import ParallelConfig
from dcwdist.parallel.dims import ParallelDims, ParallelLayoutError
from dcwdist.parallel.env import DistEnv, read_dist_env

__all__ = ["ParallelConfig", "ParallelDims", "ParallelLayoutError", "DistEnv", "read_dist_env"]
