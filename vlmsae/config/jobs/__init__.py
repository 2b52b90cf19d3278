"""One structured-config schema per job: ``<job>.py`` holds ``<Job>Job``, stored as ``<job>_schema``."""
