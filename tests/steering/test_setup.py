"""What the steering jobs load first (vlmsae.steering.setup): the job's device_map folded into the model spec,
required folders checked."""

from __future__ import annotations

import pytest


def test_llava_spec_folds_the_job_device_map_into_the_model(tmp_path):
    """The job-level ``device_map=auto`` reaches ``load_llava_spec`` (model.device_map); null keeps the model's."""
    from vlmsae.models.spec import get_model_spec
    from vlmsae.steering.setup import llava_spec, require_folder

    spec = get_model_spec("tiny_llava", seed=3)
    assert llava_spec(spec, None) is spec
    folded = llava_spec(spec, "auto")
    assert folded.device_map == "auto" and folded.seed == 3 and spec.device_map is None  # spec left as it was
    assert require_folder("sae_path", tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match=r"top_images='/no/such' is not a folder"):
        require_folder("top_images", "/no/such")
