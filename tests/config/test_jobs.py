"""The job schemas of ``steer``, ``steer_eval`` and ``browse`` (vlmsae/config/jobs/): a misspelt top-level key
fails at compose time naming it, on the command line and in the job's YAML; the jobs stay thin."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import shutil

import pytest
from omegaconf import OmegaConf

from vlmsae.config import conf_dir, register_configs
from vlmsae.config.jobs.browse import BrowseJob
from vlmsae.config.jobs.export import ExportJob
from vlmsae.config.jobs.names import NamesJob
from vlmsae.config.jobs.splice_eval import SpliceEvalJob
from vlmsae.config.jobs.stability import StabilityJob
from vlmsae.config.jobs.steer import SteerJob
from vlmsae.config.jobs.steer_eval import SteerEvalJob

# job -> (its schema, the overrides that fill its mandatory keys, a top-level key to misspell)
JOBS = {
    "steer": (SteerJob, ["sae_path=/sae"], "max_new_tokens"),
    "steer_eval": (SteerEvalJob, ["sae_path=/sae", "top_images=/top"], "top_n"),
    "browse": (BrowseJob, ["run=/runs"], "thumb_px"),
    "export": (ExportJob, ["sae_path=/sae", "format=dictionary_learning", "out=/o"], "overwrite"),
    "names": (NamesJob, ["ms_run=/ms"], "names_top"),
    "splice_eval": (SpliceEvalJob, ["sae_path=/sae"], "max_new_tokens"),
    "stability": (StabilityJob, ["runs=[/a,/b]"], "threshold"),
}


def _compose(config_dpath, name, overrides):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dpath), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _message_chain(err: BaseException | None) -> str:
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_the_job_config_is_typed_by_its_schema(job):
    schema, fill, _ = JOBS[job]
    cfg = _compose(conf_dir(), job, fill)
    assert OmegaConf.get_type(cfg) is schema
    assert set(cfg) == {f.name for f in dataclasses.fields(schema)}  # every key is a documented field
    typed = OmegaConf.to_object(cfg)
    for f in dataclasses.fields(schema):  # the defaults live in the dataclass, once (conf/<job>.yaml sets none)
        if f.default is not dataclasses.MISSING and f.default != "???" and "${" not in str(f.default):
            assert getattr(typed, f.name) == f.default, f.name


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_misspelt_key_on_the_command_line_fails_naming_it(job):
    _, fill, key = JOBS[job]
    typo = key[:-1]  # max_new_token, top_, thumb_p
    with pytest.raises(Exception) as info:
        _compose(conf_dir(), job, [*fill, f"{typo}=3"])
    assert f"'{typo}'" in _message_chain(info.value)
    with pytest.raises(Exception) as info:  # a wrong type names the key too
        _compose(conf_dir(), job, [*fill, f"{key}=abc"])
    assert key in _message_chain(info.value) and "abc" in _message_chain(info.value)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_a_misspelt_key_in_the_job_yaml_fails_naming_it(job, tmp_path):
    _, fill, key = JOBS[job]
    shutil.copytree(conf_dir(), tmp_path / "user_conf")
    fpath = tmp_path / "user_conf" / f"{job}.yaml"
    fpath.write_text(fpath.read_text() + f"\n{key}s: 3\n")
    with pytest.raises(Exception) as info:
        _compose(tmp_path / "user_conf", job, fill)
    assert f"{key}s" in _message_chain(info.value)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_the_job_is_thin(job):
    module = importlib.import_module(f"vlmsae.{job}")
    # imports inside run() are the lazy-import rule (test_layers), not logic: they do not count
    body = [ln for ln in inspect.getsource(module.run).splitlines() if not ln.lstrip().startswith(("from ", "import "))]
    n_lines = len(body)
    assert n_lines <= 45, f"vlmsae.{job}.run is {n_lines} lines: move loops and helpers into the library"
    source = inspect.getsource(module)
    assert "cfg.get(" not in source  # defaults live in the schema, not in the job
    for other in JOBS:  # jobs never import each other
        assert f"from vlmsae.{other} import" not in source and f"import vlmsae.{other}\n" not in source
