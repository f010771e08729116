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
