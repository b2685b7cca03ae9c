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


def test_changed_defaults_keep_stored_ids():
    """top_lr's default moved from 0.002 to 0.016: the ids measured in the store must keep their meaning."""
    from autodl_core.config import ID_BASELINE

    assert ID_BASELINE["top_lr"] != PipelineConfig().top_lr
    assert PipelineConfig(top_lr=0.002).pipeline_id() == "bf21a9e8fbc5"  # the store's first default
    assert PipelineConfig().pipeline_id() == PipelineConfig(top_lr=0.016).pipeline_id() == "df4d3378bb15"
    assert PipelineConfig(strategy="probe", top_lr=0.002).pipeline_id() == "8c0aed5ee340"
