"""vlfast.distributed.compat: every DeepSpeed internal a workaround touches still exists in the installed DeepSpeed."""

import warnings

import pytest

deepspeed = pytest.importorskip("deepspeed")

from vlfast.distributed import compat  # noqa: E402


def test_tested_version_is_the_pinned_one():
    import tomllib
    from pathlib import Path

    pins = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["deepspeed"]
    assert f"deepspeed=={compat.TESTED_VERSIONS[0]}" in pins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_version() == deepspeed.__version__  # the installed one is tested: no warning


def test_patched_internals_exist():
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero import partition_parameters as pp

    assert callable(ds_engine.DeepSpeedEngine._broadcast_model)
    for name in ("_zero_init_param", "_convert_to_deepspeed_param", "get_partition_dp_group"):
        assert callable(getattr(pp.Init, name)), name
    for name in ("get_world_group", "get_global_rank", "broadcast"):
        assert callable(getattr(pp.dist, name)), name
    assert callable(TorchCheckpointEngine.load)
    assert len(compat.checkpoint_classes()) == len(compat.CHECKPOINT_CLASSES)


def test_zero_dim_broadcast_restores_the_originals():
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import partition_parameters as pp

    before = (ds_engine.DeepSpeedEngine._broadcast_model, pp.Init._zero_init_param)
    with compat.zero_dim_broadcast():
        assert ds_engine.DeepSpeedEngine._broadcast_model is not before[0]
        assert pp.Init._zero_init_param is not before[1]
    assert (ds_engine.DeepSpeedEngine._broadcast_model, pp.Init._zero_init_param) == before


def test_checkpoint_loads_routes_and_restores():
    class CE:
        def load(self, path, map_location=None):
            return "unsafe"

    class Engine:
        checkpoint_engine = CE()

    seen = []
    eng = Engine()
    with compat.checkpoint_loads(eng, lambda p, map_location=None, allow=(): seen.append((p, len(allow))) or "safe"):
        assert eng.checkpoint_engine.load("x.pt") == "safe"
    assert seen == [("x.pt", len(compat.CHECKPOINT_CLASSES))]
    assert eng.checkpoint_engine.load("x.pt") == "unsafe"
    with pytest.raises(compat.DeepSpeedCompatError, match="checkpoint_engine"):
        compat.checkpoint_loads(object(), lambda *a, **k: None)


def test_version_warning(monkeypatch):
    monkeypatch.setattr(compat, "_warned", False)
    monkeypatch.setattr(compat, "TESTED_VERSIONS", ("0.0.1",))
    with pytest.warns(RuntimeWarning, match="not a version vlfast was tested with"):
        compat.check_version()
