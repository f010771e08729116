"""The step profiler: its option, the traced steps and the summary by kind of operation."""

import json

import jax
import jax.numpy as jnp
import pytest

import tiny_training
from ckt_jax import profiling, sharding, stages


@pytest.mark.parametrize("text, expected", [("", None), (" ", None), ("2:4", (2, 4)),
                                            ("3:3", (3, 3))])
def test_parse_steps(text, expected):
    assert profiling.parse_steps(text) == expected


@pytest.mark.parametrize("text", ["4:2", "0:3", "2", "2-4", "a:b", "2:4:6"])
def test_parse_steps_rejects_bad_ranges(text):
    with pytest.raises(ValueError, match=rf"config.train.profile_steps='{text}' is invalid; use"):
        profiling.parse_steps(text)


def test_profile_steps_validated_and_not_recorded():
    from ckt_jax import config_files, docs, studies

    config = config_files.load_module(docs.CONFIG_PATH).get_config()
    record = stages._distill_record(config)
    digest = studies.config_digest(config)
    config.train.profile_steps = "2:4"
    stages.validate_config(config)
    # A trace changes no result, so neither a stage's record nor a study cell's digest.
    assert stages._distill_record(config) == record
    config.train.profile_steps = ""
    assert studies.config_digest(config) == digest
    config.train.profile_steps = "5:1"
    with pytest.raises(ValueError, match=r"config.train.profile_steps='5:1' is invalid"):
        stages.validate_config(config)


def test_profiler_traces_only_its_steps(tmp_path):
    product = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    x = jnp.ones((256, 256))
    profiler = profiling.StepProfiler((2, 3), tmp_path / "profile", name="unit")
    for step in range(1, 6):
        profiler.before_step(step)
        assert (profiler.started_at is not None) == (step in (2, 3))
        product(x).block_until_ready()
        profiler.after_step(step)
    profiler.close(5)
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert (summary["first_step"], summary["last_step"]) == (2, 3)
    assert summary["busy_thread_seconds_per_step"] == pytest.approx(
        sum(summary["thread_seconds_by_kind"].values()))
    assert summary == profiler.summary
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_profile_range_past_the_last_step(tmp_path):
    # Training ends inside the range: the trace stops after the last step and is summarized.
    setup = tiny_training.build(seed=0, steps=3)
    profiler = profiling.StepProfiler((2, 9), tmp_path / "profile", name="tiny")
    _, history = tiny_training.run(setup, sharding.make_mesh(), profiler=profiler)
    assert len(history) == 3
    summary = json.loads((tmp_path / "profile" / "summary.json").read_text())
    assert (summary["first_step"], summary["last_step"]) == (2, 3)
    assert summary["busy_thread_seconds_per_step"] > 0


def test_resumed_trace_keeps_the_earlier_summary(tmp_path):
    product = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    x = jnp.ones((128, 128))
    for steps in ((2, 2), (3, 4)):
        # The second profiler is a resumed run: it starts inside the range 2:4.
        profiler = profiling.StepProfiler((steps[0], 4), tmp_path, name="unit")
        for step in range(steps[0], steps[1] + 1):
            profiler.before_step(step)
            product(x).block_until_ready()
            profiler.after_step(step)
        profiler.close(steps[1])
    assert json.loads((tmp_path / "summary.json").read_text())["first_step"] == 3
    assert json.loads((tmp_path / "summary-steps-2-2.json").read_text())["last_step"] == 2


def test_range_after_the_last_step_warns(tmp_path, caplog):
    profiler = profiling.StepProfiler((5, 9), tmp_path, name="unit")
    for step in (1, 2):
        profiler.before_step(step)
        profiler.after_step(step)
    with caplog.at_level("WARNING"):
        profiler.close(2)
    assert "start after the last step 2; nothing was traced" in caplog.text
    assert not list(tmp_path.iterdir())
