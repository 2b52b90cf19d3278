"""One structured-config schema per job (``<job>_schema``), each module with its own ``register()``."""
