"""One structured-config schema per job (``conf/<job>.yaml``), each registered by its module's ``register()``."""
