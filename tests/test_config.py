"""PipelineConfig: JSON round trip, stable ids, clear errors."""
import pytest

from autodl_core.config import SINGLE_STAGE, PipelineConfig


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
    """top_lr's default moved from 0.002 to 0.016 (0.1.9), first_chunk_seconds' from 1.5 to 0.5 (0.1.10):
    the ids measured in the store must keep their meaning, and the new default must get a new id."""
    from autodl_core.config import ID_BASELINE

    assert ID_BASELINE["top_lr"] != PipelineConfig().top_lr
    assert ID_BASELINE["first_chunk_seconds"] != PipelineConfig().first_chunk_seconds
    one_stage = SINGLE_STAGE  # the any-time steps (on by default since 0.2) did not exist then
    assert PipelineConfig(top_lr=0.002, first_chunk_seconds=1.5, **one_stage).pipeline_id() == "bf21a9e8fbc5"
    assert PipelineConfig(first_chunk_seconds=1.5, **one_stage).pipeline_id() == "df4d3378bb15"  # a later default
    assert PipelineConfig(strategy="probe", top_lr=0.002, first_chunk_seconds=1.5,
                          **one_stage).pipeline_id() == "8c0aed5ee340"
    assert PipelineConfig().pipeline_id() not in {"bf21a9e8fbc5", "df4d3378bb15"}
    assert PipelineConfig(**one_stage).pipeline_id() != PipelineConfig().pipeline_id()


def test_a_stored_record_without_the_steps_fields_stays_a_single_stage_and_upgrades_on_request():
    """A record written before the any-time steps existed was measured as one fine-tuning stage: read back
    it keeps its id; `as_steps` makes it the first step of today's steps (what the shipped store's choice
    runs as)."""
    from meta_db.portfolio import PORTFOLIO

    f96 = PORTFOLIO["mnv2-top-f96"]
    old_record = {k: v for k, v in f96.to_dict().items() if k not in SINGLE_STAGE}
    again = PipelineConfig.from_record(old_record)
    assert again == f96 and again.pipeline_id() == f96.pipeline_id() and not again.anytime_steps
    upgraded = again.as_steps()
    assert upgraded.anytime_steps and upgraded.finetune_resolution == 96 and upgraded.uses_steps("cpu")
    assert not upgraded.uses_steps("cuda")  # a GPU fine-tunes the whole network
    assert PipelineConfig.from_dict({}) == PipelineConfig()  # a user's JSON: today's defaults


def test_measured_members_keep_their_stored_ids():
    from meta_db.portfolio import PORTFOLIO, measured

    assert measured() == PipelineConfig(top_lr=0.002, first_chunk_seconds=1.5, **SINGLE_STAGE)
    assert PORTFOLIO["mnv2-top-lr16"].pipeline_id() == "df4d3378bb15"
    assert PORTFOLIO["mnv2-top-lr2"].pipeline_id() == "bf21a9e8fbc5"
    assert PORTFOLIO["mnv2-probe"].pipeline_id() == "8c0aed5ee340"
    assert PORTFOLIO["default"] == PipelineConfig(**SINGLE_STAGE) and PORTFOLIO["anytime"] == PipelineConfig()
    # measured through the official kit in 0.1.20: their runs are stored under these ids
    assert PORTFOLIO["mnv2-top-f128"].pipeline_id() == "0d7c2fc733cd"
    assert PORTFOLIO["mnv2-top-f160"].pipeline_id() == "ead968364336"
    assert PORTFOLIO["lite0-top-f128"].pipeline_id() == "c7ed095a66ed"
    # measured in 0.1.22 and retired: outside the portfolio, their ids and names on record
    from meta_db.portfolio import TRIED, name_of, resolve_pipelines

    assert TRIED["mnv2-full-ft"].pipeline_id() == "feebd12270ec"
    assert TRIED["lite2-top-f128"].pipeline_id() == "8f7b83fec1a6"
    assert not set(TRIED) & set(PORTFOLIO) and name_of("feebd12270ec") == "mnv2-full-ft"
    assert "mnv2-full-ft" not in [name for name, _ in resolve_pipelines(["portfolio"])]
    assert resolve_pipelines(["mnv2-full-ft"])[0][1] == TRIED["mnv2-full-ft"]
