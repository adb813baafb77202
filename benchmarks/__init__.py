"""quietscope's benchmarks: scripts run as modules from the repository root (``python -m benchmarks.quality``).

Every script imports what it shares from :mod:`benchmarks.harness`.
"""

import os

# distributed configures its own loggers from dask config on first import: keep them quiet. Set
# here, before any script or the harness imports quietscope (and with it dask.distributed).
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
