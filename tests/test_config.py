"""PipelineConfig: JSON round trip, stable ids, clear errors."""
import pytest

from autodl_core.config import PipelineConfig


def test_round_trip_and_stable_id():
    config = PipelineConfig(backbone="efficientnet_lite0", top_lr=0.005)
    again = PipelineConfig.from_dict(config.to_dict())
    assert again == config
    assert again.pipeline_id() == config.pipeline_id()
    assert config.pipeline_id() != PipelineConfig().pipeline_id()


def test_id_ignores_default_valued_fields_and_extra():
    assert PipelineConfig(top_lr=PipelineConfig().top_lr).pipeline_id() == PipelineConfig().pipeline_id()
    assert PipelineConfig(extra={"note": "x"}).pipeline_id() == PipelineConfig().pipeline_id()


def test_unknown_field_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pipeline fields"):
        PipelineConfig.from_dict({"backbone": "mobilenetv2_100", "learning_rate": 0.1})
