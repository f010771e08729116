"""Studies end to end on a tiny random model with SmolLM2's tokenizer and the real packaged data.

Every study config runs at its CPU size with smoke-sized stages and a tiny grid, through the
entry point's `run`, so each cell trains, evaluates and writes its outputs in seconds.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ckt_jax import config_files, main, studies, workdir
from ckt_jax.export import export_hf_directory
from ckt_jax.model import Llama, LlamaConfig

pytestmark = pytest.mark.real  # The tokenizer and data come from the asset packages.

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDIES = ("kd_weight", "budget", "precision", "data_noise", "shift", "baselines",
           "teacher_cache")
# Small grids keep the suite short: two cells where skipping and ordering matter, one elsewhere.
# The float32 and label-noise cells run the same code paths as the main job and kd_weight.
TINY_GRIDS = {"kd_weight": "0.5,2", "budget": "3", "precision": "bfloat16",
              "data_noise": "text:0.1", "shift": "default", "baselines": "kd_lora",
              "teacher_cache": "top:4"}


def load_study_config(name: str, size: str = "cpu"):
    return config_files.load_module(ROOT / "configs" / "studies" / f"{name}.py").get_config(size)


def shrink(config, model_dir: pathlib.Path, grid: str):
    """Smoke-run sizes and the tiny model, keeping the study's own settings."""
    config.model = str(model_dir)
    config.study.grid = grid
    config.data.max_benign_prompts = 8
    config.data.train_template_max_chars = 400
    config.targets.max_new_tokens = 8
    config.targets.batch_size = 8
    for section in ("teacher_train", "distill"):
        config[section].lora_rank = 4
        config[section].steps = 2
        config[section].batch_size = 2
        config[section].warmup_steps = 1
    config.checkpoint.every_steps = 1
    config.eval.limit = 4
    config.eval.max_new_tokens = 8
    config.eval.batch_size = 4
    config.eval.kd_limit = 4
    config.judge.folds = 2
    config.judge.max_prompt_tokens = 24
    config.judge.max_reply_tokens = 24
    config.judge.batch_size = 16
    config.robustness.embedding_noise = "5"
    config.robustness.char_noise = "0.2"
    config.robustness.limit = 2
    config.robustness.kl_limit = 2
    config.metrics.tensorboard = False
    config.log_every = 1
    return config


@pytest.fixture(scope="module")
def tiny_model_dir(smollm2_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("study_model")
    model_config = LlamaConfig(vocab_size=smollm2_tokenizer.vocab_size, hidden_size=32,
                               intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=8, max_position_embeddings=2048,
                               # With tied embeddings this random model replies with newlines
                               # only, which leaves the KD metrics no reply tokens to score.
                               tie_word_embeddings=False)
    params = jax.jit(Llama(model_config).init)(jax.random.key(0),
                                               jnp.zeros((1, 4), jnp.int32))["params"]
    export_hf_directory(root / "model", model_config, params, smollm2_tokenizer)
    return root / "model"


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("studies") / "work"


@pytest.mark.slow
@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_end_to_end(name, tiny_model_dir, shared_workdir, tmp_path):
    config = shrink(load_study_config(name), tiny_model_dir, TINY_GRIDS[name])
    # The shift study changes the teacher's data, so it gets its own work directory.
    work = tmp_path / "shift" if name == "shift" else shared_workdir
    main.run(config, str(work))
    study_dir = work / "studies" / name
    results = json.loads((study_dir / "results.json").read_text())
    cells = studies.study_cells(config)
    assert [r["cell"] for r in results["cells"]] == [c.name for c in cells]
    assert set(results["references"]) == {"base", "teacher"}
    for result in results["cells"]:
        m = result["metrics"]
        assert 0.0 <= m["overall_safety_score"] <= 1.0
        low, high = m["overall_safety_score_ci95"]
        assert low <= m["overall_safety_score"] <= high
        assert 0.0 <= m["judge_agreement"] <= 1.0
        assert 0.0 <= m["margin_agreement"] <= 1.0
        assert m["kd_mean_kl"] >= 0.0
        assert 0.0 <= m["kd_token_agreement"] <= 1.0
    markdown = (study_dir / "results.md").read_text()
    assert "| cell |" in markdown
    assert "Hardware:" in markdown
    for plot in results["plots"]:
        assert (study_dir / plot).read_bytes()[:4] == b"\x89PNG"
    assert results["judge"]["feature_judge"]["n"] == 169

    if name == "budget":
        assert [len(r["loss_curve"]) for r in results["cells"]] == [3]
        assert "score_vs_time.png" in results["plots"]
    if name == "precision":
        assert "non-finite losses" in markdown
        assert "loss_curves.png" in results["plots"]
    if name == "shift":
        student = results["cells"][0]["metrics"]
        assert "heldout_refusal_rate" in student
        assert "HarmBench" in markdown
        assert "StrongREJECT" in markdown
        assert "strongreject" in student["breakdown"]["eval_harmful"]["source"]
        robustness = results["cells"][0]["robustness"]["cells"]
        kinds = {cell["perturbation"] for cell in robustness}
        assert kinds == {"embedding_noise", "char_noise", "wrapper"}
        for cell in robustness:
            assert cell["symmetric_kl"] >= 0.0
        assert "robustness.png" in results["plots"]

    # A second run skips every finished cell and reproduces the same results.
    before = {p: p.read_text() for p in study_dir.glob("*/cell.json")}
    main.run(config, str(work))
    assert {p: p.read_text() for p in study_dir.glob("*/cell.json")} == before


def run_entry_point(*args):
    import os

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ckt_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("ckt_jax: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_bad_study_name_is_one_line(tmp_path):
    result = run_entry_point("--config", "configs/studies/kd_weight.py", "--workdir",
                             str(tmp_path / "w"), "--config.study.name=kd_wieght")
    line = one_line_error(result)
    assert "kd_wieght" in line
    assert "kd_weight, budget" in line
    assert not (tmp_path / "w").exists()
    result = run_entry_point("--config", "configs/studies/budget.py:huge", "--workdir",
                             str(tmp_path / "w"))
    assert "'huge'" in one_line_error(result)


@pytest.mark.parametrize("name, grid, fragments", [
    ("kd_weight", "0.5,abc", ["'abc'", "not a number", "0.25,1,4"]),
    ("kd_weight", "-1", ["'-1'", "below 0.0"]),
    ("kd_weight", "", ["is empty"]),
    ("kd_weight", "1,1.0", ["repeats a value"]),
    ("budget", "2.5", ["'2.5'", "not an integer"]),
    ("data_noise", "noise:0.1", ["label:<share> or text:<rate>"]),
    ("data_noise", "label:1.5", ["share >= 1"]),
    ("precision", "float16", ["float32,bfloat16"]),
    ("shift", "a,b", ["'default'"]),
    ("baselines", "kd_lora,dpo", ["'dpo'", "sft_lora,kd_lora,kd_noise,ckt"]),
    ("teacher_cache", "live,cached", ["'cached'", "live or top:<k>", "live,top:32"]),
    ("teacher_cache", "top:0", ["'0'", "below 1"]),
    ("teacher_cache", "top:abc", ["'top:abc'", "integer k >= 1"]),
])
def test_bad_grid_rejected_before_work(name, grid, fragments, tmp_path):
    config = load_study_config(name)
    config.study.grid = grid
    with pytest.raises(ValueError) as error:
        main.run(config, str(tmp_path / "w"))
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "w").exists()


def test_cell_from_other_config_rejected(tmp_path):
    config = load_study_config("kd_weight")
    config.study.grid = "0.5"
    cell = studies.study_cells(config)[0]
    cell_dir = tmp_path / "studies" / "kd_weight" / cell.name
    cell_dir.mkdir(parents=True)
    other = {"record": {"study": "kd_weight", "student_name": "kd_weight-0.5",
                        "overrides": {"distill.kd_weight": 0.7}}}
    (cell_dir / "cell.json").write_text(json.dumps(other))
    with pytest.raises(workdir.WorkdirError, match="use a new --workdir or delete"):
        studies._check_cell_dir(cell_dir, studies._cell_record(config, cell))
    assert json.loads((cell_dir / "cell.json").read_text()) == other


def test_cells_that_train_the_main_student_share_a_digest():
    """The config's own student appears in five studies; its cells must be recognised as one."""
    def digest(name, value):
        config = load_study_config(name)
        config.study.grid = value
        return studies.config_digest(studies.cell_config(config, studies.study_cells(config)[0]))

    main_student = {digest("budget", "40"), digest("precision", "float32"),
                    digest("data_noise", "label:0"), digest("kd_weight", "1"),
                    digest("baselines", "kd_noise")}
    assert len(main_student) == 1
    others = {digest("budget", "20"), digest("precision", "bfloat16"),
              digest("data_noise", "text:0.1"), digest("kd_weight", "4"),
              digest("baselines", "kd_lora"), digest("baselines", "ckt")}
    assert len(others) == 6
    assert not others & main_student


def test_budget_warmup_keeps_the_config_share():
    config = load_study_config("budget")
    config.distill.steps, config.distill.warmup_steps = 40, 4
    config.study.grid = "5,20,40,100"
    warmups = [c.overrides["distill.warmup_steps"] for c in studies.study_cells(config)]
    assert warmups == [1, 2, 4, 10]


def test_baseline_configs_match_the_study_cells():
    """configs/baselines/<name>.py and the baselines study train the same student."""
    study = load_study_config("baselines")
    for cell in studies.study_cells(study):
        stages_config = config_files.load_module(
            ROOT / "configs" / "baselines" / f"{cell.value}.py").get_config()
        assert stages_config.student_name == cell.value
        for dotted, value in cell.overrides.items():
            section, *rest = dotted.split(".")
            node = stages_config[section]
            for part in rest:
                node = node[part]
            assert node == value, dotted


@pytest.mark.slow
def test_identical_cell_is_reused_across_studies(tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    budget = shrink(load_study_config("budget"), tiny_model_dir, "2")
    main.run(budget, str(work))
    trained = json.loads((work / "studies" / "budget" / "2" / "cell.json").read_text())
    # shrink() leaves the student at 2 steps with 1 warm-up step, so kd_noise is budget's cell.
    config = shrink(load_study_config("baselines"), tiny_model_dir, "kd_noise")
    main.run(config, str(work))
    reused = json.loads((work / "studies" / "baselines" / "kd_noise" / "cell.json").read_text())
    assert reused["same_as"] == "budget/2"
    assert reused["metrics"] == trained["metrics"]
    assert reused["loss_curve"] == trained["loss_curve"]
    assert not (work / "students" / "baselines-kd_noise").exists()
    markdown = (work / "studies" / "baselines" / "results.md").read_text()
    assert "kd_noise (trained as budget/2)" in markdown
    assert "baselines.png" in json.loads(
        (work / "studies" / "baselines" / "results.json").read_text())["plots"]


def test_study_sizes_differ():
    for name in STUDIES:
        cpu, full = load_study_config(name, "cpu"), load_study_config(name, "full")
        assert cpu.mode == full.mode == "study"
        assert cpu.eval.limit > 0
        assert full.eval.limit == 0
        studies.study_cells(cpu)
        studies.study_cells(full)


def test_flip_labels_swaps_targets():
    from ckt_jax import stages
    from ckt_jax.data import refusals

    rows = ([{"id": f"h{i}", "label": "harmful", "reply": "I can't help with that.",
              "complete": True} for i in range(50)]
            + [{"id": f"b{i}", "label": "benign", "reply": f"answer {i}", "complete": False}
               for i in range(50)])
    original = [dict(row) for row in rows]
    flipped = stages.flip_labels(rows, 0.3, seed=0)
    changed = [i for i, (a, b) in enumerate(zip(original, rows)) if a["label"] != b["label"]]
    assert len(changed) == flipped
    assert 15 <= flipped <= 45
    benign_answers = {row["reply"] for row in original if row["label"] == "benign"}
    for i in changed:
        if original[i]["label"] == "harmful":
            assert rows[i]["reply"] in benign_answers
        else:
            assert rows[i]["reply"] in refusals.REFUSAL_REPLIES
    assert stages.flip_labels(rows, 0.0, seed=0) == 0


def test_grid_value_must_pass_run_checks():
    config = load_study_config("kd_weight")
    config.study.grid = "1,nan"
    with pytest.raises(ValueError, match="value 'nan': config.distill.kd_weight=nan is not a "
                                         "finite number"):
        studies.study_cells(config)


def test_cell_top_k_checked_early(tmp_path):
    config = load_study_config("teacher_cache")
    config.study.grid = "top:100000"
    with pytest.raises(ValueError, match="value 'top-100000': config.distill.teacher_cache.top_k"
                                         "=100000 exceeds the vocabulary size"):
        main.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "data").exists()
