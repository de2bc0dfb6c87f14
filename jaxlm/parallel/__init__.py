"""How one model runs on many devices: the mesh and the rules table that turn logical axis names
into shardings (sharding.py), and the pipeline schedules over the `stage` axis (pipeline.py)."""
