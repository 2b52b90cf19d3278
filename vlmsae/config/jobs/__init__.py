"""One schema per job (the top level of ``conf/<job>.yaml``), each registered by its module's ``register()``."""
