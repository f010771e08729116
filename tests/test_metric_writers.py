"""Metric sinks: a tiny training run writes JSONL and TensorBoard files that TensorBoard reads."""

import json

import jax
import numpy as np
import pytest

from ckt_jax import lora, metric_writers
from ckt_jax.model import Llama
from ckt_jax.objective import ObjectiveConfig, build_objective
from ckt_jax.train import make_train_step, train_loop

STEPS = 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Train a tiny model for STEPS steps with both writers; return (log_dir, history, schedule)."""
    from test_training import TINY, tiny_batch, tiny_setup

    student, adapters, backbone, teacher_params = tiny_setup()
    schedule = lora.warmup_cosine(1e-2, STEPS, 1)
    optimizer = lora.make_adapter_optimizer(schedule)
    objective = ObjectiveConfig(kd_weight=1.0, consistency_weight=0.5, l2_weight=1e-3)
    step_fn = make_train_step(build_objective(student, Llama(TINY), objective), optimizer)
    batches = (tiny_batch(seed) for seed in range(1, 100))
    writers = metric_writers.open_run_writers(tmp_path_factory.mktemp("logs") / "student")
    with writers:
        _, _, history = train_loop(
            step_fn=step_fn, adapter_params=adapters, opt_state=optimizer.init(adapters),
            frozen_params={"backbone": backbone, "teacher": teacher_params}, batches=batches,
            num_steps=STEPS, rng=jax.random.PRNGKey(1), log_every=10, name="test",
            on_metrics=metric_writers.training_callback(writers, schedule))
    (log_dir,) = {writer.path.parent for writer in writers.writers
                  if isinstance(writer, metric_writers.JsonlWriter)}
    return log_dir, history, schedule


def test_jsonl_has_every_term_per_step(tiny_run):
    log_dir, history, schedule = tiny_run
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record, metrics in zip(records, history):
        for key in ("loss", "loss/kd", "loss/consistency", "loss/l2", "weight/kd", "grad_norm",
                    "update_norm", "param_norm", "tokens", "seconds"):
            assert record[key] == pytest.approx(metrics[key]), key
        assert record["learning_rate"] == pytest.approx(float(schedule(record["step"] - 1)))
        assert record["tokens"] == 4 * 16 - 4  # one row has 4 padding tokens
        assert record["step_seconds"] > 0
        assert record["tokens_per_second"] == pytest.approx(
            record["tokens"] / record["step_seconds"])
    # Warm-up of 1 step: the first step runs at learning rate 0, the second at the peak.
    assert records[0]["learning_rate"] == 0.0
    assert records[1]["learning_rate"] == pytest.approx(1e-2)


def test_tensorboard_events_readable(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir, history, _ = tiny_run
    assert list(log_dir.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    for tag in ("loss", "loss/kd", "loss/consistency", "loss/l2", "grad_norm", "learning_rate",
                "tokens_per_second", "step_seconds"):
        assert tag in tags, tag
    events = accumulator.Scalars("loss")
    assert [event.step for event in events] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([event.value for event in events],
                               [metrics["loss"] for metrics in history], rtol=1e-6)


def test_runs_get_separate_directories(tmp_path):
    first = metric_writers.open_run_writers(tmp_path / "teacher", tensorboard=False)
    second = metric_writers.open_run_writers(tmp_path / "teacher", tensorboard=False)
    with first, second:
        paths = {writer.path for writer in first.writers + second.writers}
    assert len(paths) == 2


def test_jsonl_writes_null_for_nan(tmp_path):
    writer = metric_writers.JsonlWriter(tmp_path / "metrics.jsonl")
    writer.write(1, {"loss": float("nan"), "grad_norm": 2.0})
    writer.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["loss"] is None
    assert record["grad_norm"] == 2.0


def test_disabled_writers_write_nothing(tmp_path):
    writers = metric_writers.open_run_writers(tmp_path / "run", tensorboard=False, jsonl=False)
    assert writers.writers == []
    assert not (tmp_path / "run").exists()
