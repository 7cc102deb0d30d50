"""The run engine: the driver, the per-partition steps, the Dask cluster, global passes, commit and pack."""
