"""The ConfigStore entries of the core config nodes: ``(group, name, dataclass)``.

The dataclasses live in :mod:`vlmsae.config.nodes` (one per node, shared by Hydra and the library).
They are stored at the root of the ConfigStore (not inside their group, where ``--help`` and Hydra's
"Available options" would list them as choices), and group YAMLs start with
``defaults: [/<name>@_here_, _self_]``; e.g. ``conf/sae/topk.yaml`` lists ``/sae_schema@_here_``.
Add a field to the node's dataclass before using it in a YAML.
"""

from __future__ import annotations

from typing import Any

from vlmsae.config.nodes import (
    DataSchema,
    EmbedderSpec,
    LoggerSchema,
    ModelSpec,
    SAEConfig,
    TaxonomySchema,
    TrainerSchema,
)

# (the group a schema types, its ConfigStore name at the root, the dataclass)
SCHEMAS: list[tuple[str | None, str, type]] = [
    ("sae", "sae_schema", SAEConfig),
    ("model", "model_schema", ModelSpec),
    ("data", "data_schema", DataSchema),
    ("trainer", "trainer_schema", TrainerSchema),
    ("logger", "logger_schema", LoggerSchema),
    ("embedder", "embedder_schema", EmbedderSpec),
    ("taxonomy", "taxonomy_schema", TaxonomySchema),
]


def store_node(schema: type) -> Any:
    """What the ConfigStore holds for ``schema``: its structured config, writable.

    OmegaConf makes the config of a frozen dataclass (SAEConfig) read-only, and then Hydra cannot merge the
    group YAML or a command-line override into it. The node keeps its type, so unknown keys and wrong
    types still fail at compose time; the frozen instance is built from it later (``vlmsae.config.to_typed``).
    """
    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    OmegaConf.set_readonly(node, None)
    return node
