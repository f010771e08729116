"""The results page generator on hand-made work directories."""

import json

import pytest

from ckt_jax import results_page

PNG = b"\x89PNG\r\n\x1a\n" + b"0" * 16


def make_study(root, name="kd_weight"):
    study_dir = root / "studies" / name
    study_dir.mkdir(parents=True)
    (study_dir / "results.json").write_text(json.dumps({"study": name, "plots": ["score.png"]}))
    (study_dir / "results.md").write_text(f"# Study `{name}` (cpu size)\n\n| cell |\n|---|\n| 1 |\n")
    (study_dir / "score.png").write_bytes(PNG)


def make_report(root):
    model = {"overall_safety_score": 0.5, "overall_safety_score_ci95": [0.4, 0.6],
             "harmful_refusal_rate": 0.75, "harmful_refusal_rate_ci95": [0.5, 0.9]}
    report = {"models": {"base": model}, "eval_counts": {"eval_harmful": 4},
              "refusal_detector": {"n": 169, "accuracy": 0.7, "precision": 1.0, "recall": 0.5},
              "stage_seconds": {"eval": 12.0}}
    (root / "report.json").write_text(json.dumps(report))


def test_page_includes_tables_and_plots(tmp_path):
    work = tmp_path / "runs" / "studies"
    work.mkdir(parents=True)
    make_study(work)
    make_report(work)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    results_page.main(["--workdir", str(work), "--out", str(page)])
    text = page.read_text()
    assert "### Study `kd_weight` (cpu size) in `studies`" in text
    assert "| 1 |" in text
    assert "![kd_weight score.png](results/studies/kd_weight/score.png)" in text
    assert (tmp_path / "docs" / "results" / "studies" / "kd_weight" / "score.png").read_bytes() == PNG
    assert "| base | 0.500 [0.40, 0.60] | 0.750 [0.50, 0.90]" in text
    assert "eval 12" in text


def test_page_rejects_empty_workdir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as stopped:
        results_page.main(["--workdir", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "page.md")])
    assert stopped.value.code == 2
    assert "neither report.json nor studies/*/results.json" in capsys.readouterr().err
    assert not (tmp_path / "page.md").exists()


def test_page_keeps_study_committed_earlier(tmp_path):
    page = tmp_path / "docs" / "results.md"
    first = tmp_path / "old" / "studies"
    first.mkdir(parents=True)
    make_study(first, "kd_weight")
    results_page.main(["--workdir", str(first), "--out", str(page)])
    copies = tmp_path / "docs" / "results" / "studies"
    assert (copies / "kd_weight" / "results.md").exists()
    assert json.loads((copies / "kd_weight" / "results.json").read_text())["study"] == "kd_weight"

    # A later work directory of the same name contains another study only: both stay on the page.
    second = tmp_path / "new" / "studies"
    second.mkdir(parents=True)
    make_study(second, "budget")
    results_page.main(["--workdir", str(second), "--out", str(page)])
    text = page.read_text()
    assert "### Study `budget` (cpu size) in `studies`" in text
    assert "### Study `kd_weight` (cpu size) in `studies`" in text
    assert "![kd_weight score.png](results/studies/kd_weight/score.png)" in text
    assert text.count("### Study `kd_weight`") == 1


def test_page_keeps_unlisted_workdirs(tmp_path, capsys):
    page = tmp_path / "results.md"
    studies = tmp_path / "studies"
    studies.mkdir()
    make_study(studies)
    results_page.main(["--workdir", str(studies), "--out", str(page)])
    before = page.read_text()

    smoke = tmp_path / "smoke"
    smoke.mkdir()
    make_report(smoke)
    with pytest.raises(SystemExit) as stopped:
        results_page.main(["--workdir", str(smoke), "--out", str(page)])
    assert stopped.value.code == 2
    assert "shows the work directories studies, which no --workdir names" in capsys.readouterr().err
    assert page.read_text() == before

    results_page.main(["--workdir", str(smoke), "--out", str(page), "--replace"])
    assert "## `smoke`" in page.read_text()
    assert "## `studies`" not in page.read_text()


def test_page_rejects_unusable_out(tmp_path, capsys):
    work = tmp_path / "smoke"
    work.mkdir()
    make_report(work)
    blocking = tmp_path / "a_file"
    blocking.write_text("")
    for out, message in ((tmp_path, "is a directory"),
                         (blocking / "page.md", "which is a file")):
        with pytest.raises(SystemExit) as stopped:
            results_page.main(["--workdir", str(work), "--out", str(out)])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err
