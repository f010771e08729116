"""Work-directory guards: stage records, output digests and readable errors for damaged files."""

import json
import pathlib

import pytest

from ckt_jax import workdir


def finished_stage(tmp_path):
    stage_dir = tmp_path / "targets"
    stage_dir.mkdir()
    workdir.write_jsonl(stage_dir / "replies.jsonl", [{"id": i} for i in range(8)])
    workdir.mark_stage_done(stage_dir, {"seed": 0}, {"replies": 8})
    return stage_dir


def test_finished_stage_is_reused(tmp_path):
    stage_dir = finished_stage(tmp_path)
    assert workdir.stage_done(stage_dir, {"seed": 0})
    assert "replies.jsonl" in json.loads((stage_dir / "stage.json").read_text())["files"]


def test_other_config_is_rejected(tmp_path):
    stage_dir = finished_stage(tmp_path)
    with pytest.raises(workdir.WorkdirError, match="seed=0, this config has 1"):
        workdir.stage_done(stage_dir, {"seed": 1})


def test_shortened_output_is_rejected(tmp_path):
    stage_dir = finished_stage(tmp_path)
    lines = (stage_dir / "replies.jsonl").read_text().splitlines(keepends=True)
    (stage_dir / "replies.jsonl").write_text("".join(lines[:3]))
    with pytest.raises(workdir.WorkdirError, match="missing or changed.*delete .*targets"):
        workdir.stage_done(stage_dir, {"seed": 0})


def test_deleted_output_is_rejected(tmp_path):
    stage_dir = finished_stage(tmp_path)
    (stage_dir / "replies.jsonl").unlink()
    with pytest.raises(workdir.WorkdirError, match="replies.jsonl is missing or changed"):
        workdir.stage_done(stage_dir, {"seed": 0})


def test_stage_without_digests_still_reused(tmp_path):
    # stage.json files written before digests existed have no "files" entry.
    stage_dir = finished_stage(tmp_path)
    content = json.loads((stage_dir / "stage.json").read_text())
    del content["files"]
    (stage_dir / "stage.json").write_text(json.dumps(content))
    assert workdir.stage_done(stage_dir, {"seed": 0})


@pytest.mark.parametrize("text", ["[]", '{"config": 5}', '{"config": {}, "files": []}', "{",
                                  "\udcff"])
def test_malformed_stage_record_is_one_error(tmp_path, text):
    stage_dir = finished_stage(tmp_path)
    (stage_dir / "stage.json").write_text(text, errors="surrogateescape")
    with pytest.raises(workdir.WorkdirError, match="stage.json is unreadable.*delete .*targets"):
        workdir.stage_done(stage_dir, {"seed": 0})


def test_broken_jsonl_line_names_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(workdir.WorkdirError, match="rows.jsonl line 2 is not valid JSON"):
        workdir.read_jsonl(path)


def test_unwritable_workdir_is_one_line(tmp_path, monkeypatch):
    # /sys refuses new directories even to root, so this fails the same way for every user.
    with pytest.raises(workdir.WorkdirError, match="--workdir /sys/ckt_jax_w cannot be written "
                       r"\(Operation not permitted\); pass a directory you can write to"):
        workdir.prepare_workdir("/sys/ckt_jax_w")

    # A directory that exists but refuses new files fails before any stage runs.
    root = tmp_path / "work"
    workdir.prepare_workdir(root)
    real_write_text = pathlib.Path.write_text

    def refuse_probe(path, *args, **kwargs):
        if path.name.startswith(".write-check"):
            raise PermissionError(13, "Permission denied")
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", refuse_probe)
    with pytest.raises(workdir.WorkdirError, match="cannot be written \\(Permission denied\\)"):
        workdir.prepare_workdir(root)


def test_evaluation_of_an_earlier_training_run_is_redone(tmp_path):
    from types import SimpleNamespace

    from ckt_jax import stages

    student_dir = tmp_path / "students" / "student"
    ctx = SimpleNamespace(stage_dir=lambda name: tmp_path / name, student_name="student",
                          student_dir=student_dir)
    assert stages._training_digest(ctx, "student") is None
    student_dir.mkdir(parents=True)
    (student_dir / "history.jsonl").write_text('{"step": 1, "seconds": 3.0}\n')
    workdir.mark_stage_done(student_dir, {"distill": 1})
    first = stages._training_digest(ctx, "student")
    assert first is not None and stages._training_digest(ctx, "base") is None

    model_dir = tmp_path / "eval" / "student"
    record = {"eval": {"limit": 4}}
    model_dir.mkdir(parents=True)
    (model_dir / stages.TRAINED_FILE).write_text(json.dumps({"history_sha256": first}))
    workdir.mark_stage_done(model_dir, record)
    assert stages._evaluation_current(model_dir, record, first)
    # Trained again with the same config: the history (its wall times) differs.
    (student_dir / "history.jsonl").write_text('{"step": 1, "seconds": 2.5}\n')
    workdir.mark_stage_done(student_dir, {"distill": 1})
    second = stages._training_digest(ctx, "student")
    assert second != first
    assert not stages._evaluation_current(model_dir, record, second)
    # Deciding changes nothing: the earlier results stay until the model loads and they are
    # replaced, so an eval that fails to load the model loses nothing.
    assert (model_dir / "stage.json").exists()
    # A model without a training record (its directory deleted) cannot be compared.
    assert stages._evaluation_current(model_dir, record, None)


def test_evaluation_without_a_training_record_is_reused(tmp_path):
    from ckt_jax import stages

    record = {"eval": {"limit": 4}}
    workdir.mark_stage_done(tmp_path, record)
    assert stages._evaluation_current(tmp_path, record, "abc")


@pytest.mark.parametrize("damage", ["truncate_data", "drop_metadata"])
def test_damaged_adapters_name_the_stage(tmp_path, damage):
    import numpy as np

    from ckt_jax import stages

    adapters = {"layers": {"q": {"lora_a": np.ones((2, 8, 4), np.float32)}}}
    directory = tmp_path / "students" / "s" / "adapters"
    stages.save_adapters(directory, adapters)
    np.testing.assert_array_equal(stages.load_adapters(directory)["layers"]["q"]["lora_a"],
                                  adapters["layers"]["q"]["lora_a"])
    if damage == "truncate_data":
        for path in (p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"):
            path.write_bytes(path.read_bytes()[:10])
    else:
        (directory / "_METADATA").unlink()
    with pytest.raises(ValueError, match=r"adapters in .*adapters are unreadable .*delete "
                                         r".*students/s and run its stage again"):
        stages.load_adapters(directory)
