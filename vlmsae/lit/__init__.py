"""Lightning training of the pure-torch SAEs (vlmsae.sae): ``module`` (one SAE or a grid), ``fit`` (one run),
``datamodule`` (rows from a store or from images), ``resume``, ``loggers``, ``callbacks`` (the Hydra sweep
summary). This package imports nothing, so Hydra can load the callback without torch or Lightning.
"""
