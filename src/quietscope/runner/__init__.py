"""Executes block plans on a dask cluster: bounded in-flight, one model per worker, ledger, progress."""
