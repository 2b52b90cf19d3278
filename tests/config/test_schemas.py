"""The Hydra config tree: every option of every group composes; typos and wrong types fail, naming the key.

The lists are read from conf/ when the tests are collected, so a new YAML is tested as soon as it
exists. Each option is composed through every primary config (conf/<job>.yaml) whose defaults list
its group (and that composes on its own: a broken primary fails its own test once); options of a
group no primary uses are composed on their own (``+group=option``).
Groups with a structured schema must actually be typed by it, and every sae option must build an SAE.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from vlmsae.config import conf_dir, to_typed
from vlmsae.config.nodes import SCHEMAS

CONF_DPATH = conf_dir()
SCHEMA_OF_GROUP = {group: node for group, _name, node in SCHEMAS if group}


def _primaries() -> dict[str, set[str]]:
    """{primary config name: the groups its defaults list}."""
    out = {}
    for fpath in sorted(CONF_DPATH.glob("*.yaml")):
        defaults = OmegaConf.to_container(OmegaConf.load(fpath)).get("defaults", []) or []
        groups = set()
        for entry in defaults:
            if isinstance(entry, dict):
                for key in entry:
                    key = key.removeprefix("override ").removeprefix("optional ").strip()
                    groups.add(key.split("@")[0].split("/")[0])
        out[fpath.stem] = groups
    return out


PRIMARIES = _primaries()
GROUP_OPTIONS = sorted(
    (group_dpath.name, fpath.stem)
    for group_dpath in CONF_DPATH.iterdir()
    if group_dpath.is_dir()
    for fpath in group_dpath.glob("*.yaml")
)


def _message_chain(err: BaseException) -> str:
    """The error and its causes, as a user sees them printed by Hydra."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


@pytest.fixture(scope="module")
def compose_any():
    """compose_any(config_name or None, overrides, hydra=False) -> DictConfig from the real conf/ tree."""
    from hydra import compose, initialize_config_dir

    from vlmsae.config import register_configs

    register_configs()

    def _compose(config_name, overrides, hydra=False):
        with initialize_config_dir(config_dir=str(CONF_DPATH), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)

    return _compose


def test_tree_has_the_groups_and_options_the_issue_asks_for():
    options = {}
    for group, option in GROUP_OPTIONS:
        options.setdefault(group, set()).add(option)
    assert options["sae"] >= {"relu", "topk", "batchtopk", "matryoshka", "tiny"}
    assert options["model"] >= {"clip_b32", "clip_l14", "clip_l14_336", "siglip_so400m", "tiny"}
    assert options["trainer"] >= {"cpu", "gpu", "ddp", "tiny"}
    assert options["logger"] >= {"none", "csv", "wandb"}
    assert {"data", "hydra", "experiment"} <= set(options) | {p.name for p in CONF_DPATH.iterdir() if p.is_dir()}
    for group, opts in options.items():
        if group not in ("hydra", "experiment"):
            assert "tiny" in opts, f"conf/{group}/ has no tiny option (tests and the demo need one)"


@pytest.fixture(scope="module")
def healthy_primaries(compose_any) -> set[str]:
    """Primaries that compose with their own defaults; a broken one fails its own test below, once,
    instead of failing every option test of the groups it lists."""
    ok = set()
    for name in PRIMARIES:
        try:
            compose_any(name, [], hydra=True)
            ok.add(name)
        except Exception:
            pass
    return ok


@pytest.mark.parametrize("primary", sorted(PRIMARIES))
def test_primary_composes_with_its_defaults(compose_any, primary):
    cfg = compose_any(primary, [], hydra=True)
    assert cfg.hydra.job.chdir is False  # outputs go under the run dir, the process stays in the repo


@pytest.mark.parametrize("group, option", GROUP_OPTIONS, ids=[f"{g}/{o}" for g, o in GROUP_OPTIONS])
def test_every_group_option_composes(compose_any, healthy_primaries, group, option):
    users = [name for name, groups in PRIMARIES.items() if group in groups and name in healthy_primaries]
    if group == "experiment":
        # Recipes are `# @package _global_` files that override other groups: they need a primary
        # with those groups; each must compose through at least one (train first).
        errors = {}
        for name in sorted(users or PRIMARIES, key=lambda n: (n != "train", n)):
            try:
                compose_any(name, [f"{'' if name in users else '+'}experiment={option}"])
                return
            except Exception as err:
                errors[name] = _message_chain(err)
        pytest.fail(f"experiment={option} composes through no primary config: {errors}")
    if group == "hydra":
        for name in users:
            cfg = compose_any(name, [f"hydra={option}"], hydra=True)
            assert "outputs/" in str(OmegaConf.to_container(cfg.hydra.sweep, resolve=False)), name
        return
    composed = []
    for name in users:
        composed.append(compose_any(name, [f"{group}={option}"]))
    if not users:  # no job uses the group (yet): compose the option on its own
        composed.append(compose_any(None, [f"+{group}={option}"]))
    for cfg in composed:
        node = cfg[group]
        schema = SCHEMA_OF_GROUP.get(group)
        if schema is not None:
            assert OmegaConf.get_type(node) is schema, (
                f"conf/{group}/{option}.yaml is not typed by {schema.__name__}: start it with "
                f"`defaults: [/{group}_schema@_here_, _self_]`"
            )
        if group == "sae":
            from vlmsae.sae import SAEConfig, build_sae

            sae_cfg = to_typed(node, SAEConfig).resolved(16)
            assert build_sae(sae_cfg).n_latents == sae_cfg.n_latents


def _sae_primary() -> tuple[str | None, list[str]]:
    users = [name for name, groups in PRIMARIES.items() if "sae" in groups]
    return ("train", []) if "train" in users else (users[0], []) if users else (None, ["+sae=topk"])


def test_unknown_key_fails_naming_it(compose_any):
    primary, base = _sae_primary()
    with pytest.raises(Exception) as info:
        compose_any(primary, [*base, "sae.kk=3"])
    assert "sae.kk" in _message_chain(info.value)


def test_wrong_type_fails_naming_key_and_value(compose_any):
    primary, base = _sae_primary()
    with pytest.raises(Exception) as info:
        compose_any(primary, [*base, "sae.k=abc"])
    message = _message_chain(info.value)
    assert "sae.k" in message and "abc" in message and "Integer" in message


@pytest.mark.parametrize("group", sorted(SCHEMA_OF_GROUP))
def test_every_schema_group_refuses_typos_and_wrong_types(compose_any, group):
    """Not just sae: each structured group refuses an unknown key and a string where an int belongs."""
    options = sorted(o for g, o in GROUP_OPTIONS if g == group)
    if not options:
        pytest.skip(f"conf/{group}/ has no options yet")
    base = [f"+{group}={'tiny' if 'tiny' in options else options[0]}"]
    with pytest.raises(Exception) as info:
        compose_any(None, [*base, f"{group}.no_such_key=1"])
    assert f"{group}.no_such_key" in _message_chain(info.value)
    schema = SCHEMA_OF_GROUP[group]
    int_fields = [name for name, typ in schema.__annotations__.items() if typ in ("int", int)]
    if int_fields:
        with pytest.raises(Exception) as info:
            compose_any(None, [*base, f"{group}.{int_fields[0]}=abc"])
        assert f"{group}.{int_fields[0]}" in _message_chain(info.value)


def test_unknown_option_lists_the_available_ones(compose_any):
    primary, _base = _sae_primary()
    override = "sae=topkk" if primary else "+sae=topkk"
    with pytest.raises(Exception) as info:
        compose_any(primary, [override])
    message = _message_chain(info.value)
    assert "sae/topkk" in message and "batchtopk" in message


# --- One dataclass per node (issue 13 item 2): Hydra's schema is the library's type ----------------------------------


def test_each_node_schema_is_the_class_the_library_takes():
    import vlmsae.models
    import vlmsae.models.embedders
    import vlmsae.models.spec
    import vlmsae.sae
    import vlmsae.sae.config

    assert SCHEMA_OF_GROUP["model"] is vlmsae.models.ModelSpec is vlmsae.models.spec.ModelSpec
    assert SCHEMA_OF_GROUP["embedder"] is vlmsae.models.embedders.EmbedderSpec
    assert SCHEMA_OF_GROUP["sae"] is vlmsae.sae.SAEConfig is vlmsae.sae.config.SAEConfig


def test_registered_nodes_carry_the_node_class(compose_any):
    """What Hydra stores as <group>_schema (at the root) is typed by the node class itself (not a copy of it)."""
    from hydra.core.config_store import ConfigStore

    compose_any(None, [])  # registers
    for _group, name, schema in SCHEMAS:
        node = ConfigStore.instance().load(f"{name}.yaml").node
        assert OmegaConf.get_type(node) is schema, name


def test_composed_nodes_become_the_library_dataclasses(compose_any):
    from vlmsae.config.jobs.monosemanticity import MonosemanticityJob
    from vlmsae.models import ModelSpec
    from vlmsae.models.embedders import EmbedderSpec
    from vlmsae.sae import SAEConfig

    cfg = compose_any("monosemanticity", ["model=tiny", "embedder=pixels", "sae_path=/x"])
    job = to_typed(cfg, MonosemanticityJob)  # the one conversion a job makes: every node its dataclass
    assert isinstance(job.model, ModelSpec) and job.model == to_typed(cfg.model, ModelSpec)
    assert isinstance(job.embedder, EmbedderSpec) and job.embedder.embed_dim == cfg.embedder.embed_dim
    sae_cfg = compose_any("train", ["sae=matryoshka", "sae.expansion=2"]).sae
    node = OmegaConf.to_object(sae_cfg)  # the frozen dataclass itself, unresolved: its width is not known yet
    assert isinstance(node, SAEConfig) and (node.d_in, node.n_latents) == (None, None)
    resolved = to_typed(sae_cfg, SAEConfig).resolved(16)
    assert resolved == node.resolved(16) and (resolved.d_in, resolved.n_latents, resolved.expansion) == (16, 32, 2)
    assert resolved.group_sizes == [2, 4, 8, 18]


@pytest.mark.parametrize(
    "override, value",
    [
        ("model.seed=3", 3),
        ("model.patch_size=4", 4),
        ("model.quick_gelu=false", False),
        ("model.image_mean=[0.5,0.5,0.5]", [0.5, 0.5, 0.5]),
        ("model.image_interpolation=bilinear", "bilinear"),
        ("model.image_resize_mode=squash", "squash"),
        ("model.device_map=auto", "auto"),
        ("model.local_files_only=true", True),
    ],
)
def test_former_model_extra_keys_are_typed_fields(compose_any, override, value):
    from vlmsae.models import ModelSpec

    key = override.split("=")[0]
    spec = to_typed(compose_any("extract", ["model=tiny", override]).model, ModelSpec)
    assert getattr(spec, key.split(".")[1]) == value
    with pytest.raises(Exception) as info:  # the old spelling is now a typo, named at compose time
        compose_any("extract", ["model=tiny", f"model.extra.{key.split('.')[1]}=1"])
    assert "model.extra" in _message_chain(info.value)


def test_former_data_and_embedder_extra_keys_are_typed_fields(compose_any):
    cfg = compose_any(
        "monosemanticity",
        [
            "sae_path=/x",
            "data=tiny",
            "data.n_per_class=2",
            "data.size=32",
            "embedder=tiny",
            "embedder.quick_gelu=true",
            "embedder.image_std=[1,1,1]",
        ],
    )
    assert (cfg.data.n_per_class, cfg.data.size, cfg.embedder.quick_gelu) == (2, 32, True)
    assert (
        compose_any("train", ["data=images", "data.root=/x", "data.images_per_forward=8"]).data.images_per_forward == 8
    )
    for bad in ("data.n_per_class=abc", "data.images_per_forward=x", "embedder.quick_gelu=maybe"):
        with pytest.raises(Exception) as info:
            compose_any("monosemanticity", ["sae_path=/x", bad])
        assert bad.split("=")[0] in _message_chain(info.value), bad
    # The untyped dicts and the dead trainer.seed are gone: naming them is a typo.
    for primary, gone, named in (
        ("monosemanticity", "data.extra.n_per_class=2", "data.extra"),
        ("monosemanticity", "embedder.extra.quick_gelu=true", "embedder.extra"),
        ("train", "trainer.seed=1", "trainer.seed"),
    ):
        with pytest.raises(Exception) as info:
            compose_any(primary, [gone] + (["sae_path=/x"] if primary == "monosemanticity" else []))
        assert named in _message_chain(info.value), gone


@pytest.mark.parametrize("group", sorted(SCHEMA_OF_GROUP))
def test_schemas_are_not_offered_as_choices(compose_any, group):
    """`--help` and Hydra's "Available options" list a group's choices: never its `<group>_schema`."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    with initialize_config_dir(config_dir=str(CONF_DPATH), version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options(group)
    assert options and not [o for o in options if o.endswith("_schema")], options
    with pytest.raises(MissingConfigException) as err:
        compose_any(None, [f"+{group}=no_such_choice"])
    assert "Available options" in str(err.value) and "_schema" not in str(err.value)
