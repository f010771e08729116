"""The chat and export modes of the entry point.

Most tests use a tiny random model that carries SmolLM2's tokenizer, saved as a Hugging Face
directory, with a student whose adapters are random instead of trained, so that every path runs
in seconds. One test chats with the real SmolLM2 weights through the command line.
"""

import io
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ckt_jax import lora, main, modes, stages, workdir
from ckt_jax.chat import ChatSession, StreamDecoder
from ckt_jax.export import export_hf_directory
from ckt_jax.generate import greedy_generate, stream_generate
from ckt_jax.loading import load_hf_checkpoint
from ckt_jax.model import Llama, LlamaConfig, LoraConfig
from ckt_jax.peft_format import export_peft_adapter, load_peft_adapter

pytestmark = pytest.mark.real  # SmolLM2's tokenizer comes from the packaged GGUF file.

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Name a fruit."]


def smoke_config():
    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import smoke
    finally:
        sys.path.pop(0)
    return smoke.get_config()


@pytest.fixture(scope="module")
def tiny_workdir(smollm2_tokenizer, tmp_path_factory):
    """(config, work directory, student adapters): a tiny model with a saved random student."""
    root = tmp_path_factory.mktemp("modes")
    model_config = LlamaConfig(vocab_size=smollm2_tokenizer.vocab_size, hidden_size=32,
                               intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=8, max_position_embeddings=1024)
    params = jax.jit(Llama(model_config).init)(jax.random.key(0),
                                               jnp.zeros((1, 4), jnp.int32))["params"]
    export_hf_directory(root / "model", model_config, params, smollm2_tokenizer)

    config = smoke_config()
    config.model = str(root / "model")
    student_lora = LoraConfig(rank=config.distill.lora_rank, alpha=config.distill.lora_alpha,
                              targets=tuple(config.distill.lora_targets.split(",")))
    full = jax.jit(Llama(model_config, lora=student_lora).init)(
        jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    keys = iter(jax.random.split(jax.random.key(2), 64))
    adapters = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape),
                            lora.split_params(full)[0])

    work = workdir.prepare_workdir(root / "work")
    student_dir = work / "students" / config.student_name
    stages.save_adapters(student_dir / "adapters", adapters)
    workdir.mark_stage_done(student_dir, stages._distill_record(config))
    return config, work, adapters


def student_params(config, adapters):
    model_config, base = load_hf_checkpoint(config.model)
    scale = config.distill.lora_alpha / config.distill.lora_rank
    return model_config, lora.merge_lora(lora.combine_params(adapters, base), scale)


def test_export_writes_peft_and_hf(tiny_workdir, tmp_path):
    config, work, adapters = tiny_workdir
    config = config.copy_and_resolve_references()
    config.mode = "export"
    config.export.formats = "peft,hf"
    config.export.dir = str(tmp_path / "out")
    main.run(config, str(work))

    lora_config, loaded = load_peft_adapter(tmp_path / "out" / "peft", student_params(
        config, adapters)[0])
    assert lora_config.rank == config.distill.lora_rank
    for expected, got in zip(jax.tree.leaves(adapters), jax.tree.leaves(loaded)):
        np.testing.assert_allclose(got, np.asarray(expected), atol=1e-7)

    model_config, merged = student_params(config, adapters)
    _, exported = load_hf_checkpoint(tmp_path / "out" / "hf")
    ids_1xL = jnp.asarray([[1, 200, 300, 400, 2]])
    expected_logits = Llama(model_config).apply({"params": merged}, ids_1xL).logits_BxLxV
    got_logits = Llama(model_config).apply({"params": exported}, ids_1xL).logits_BxLxV
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(expected_logits), atol=1e-5)

    # Weights are as readable as the other files of the export (safetensors writes 0600).
    modes_of = {path.stat().st_mode & 0o777 for path in (tmp_path / "out").rglob("*")
                if path.is_file()}
    assert len(modes_of) == 1, modes_of

    with pytest.raises(FileExistsError, match="is not empty"):
        main.run(config, str(work))


@pytest.mark.parametrize("changes, error, message", [
    ({"export.formats": "gguf"}, ValueError, "copies the tokenizer from the base GGUF file"),
    ({"export.formats": "onnx"}, ValueError, r"unknown formats \['onnx'\]"),
    ({"export.formats": " , "}, ValueError, r"config.export.formats=' , ' is empty"),
    ({"export.model": "base", "export.formats": "peft"}, ValueError, "no LoRA adapters"),
    ({"export.model": "teacher", "export.formats": "hf"}, FileNotFoundError, "no teacher in"),
    ({"mode": "serve"}, ValueError, "config.mode='serve' is invalid"),
])
def test_export_errors(tiny_workdir, tmp_path, changes, error, message):
    config, work, _ = tiny_workdir
    config = config.copy_and_resolve_references()
    config.mode = "export"
    config.export.dir = str(tmp_path / "out")
    for field, value in changes.items():
        section, _, name = field.rpartition(".")
        (config[section] if section else config)[name] = value
    with pytest.raises(error, match=message):
        main.run(config, str(work))


def test_chat_prompts_file_matches_greedy(tiny_workdir, smollm2_tokenizer, tmp_path, capsys):
    config, work, adapters = tiny_workdir
    config = config.copy_and_resolve_references()
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS[:1] + [""] + PROMPTS[1:]) + "\n")
    config.mode = "chat"
    config.chat.prompts_file = str(prompts_file)
    config.chat.max_new_tokens = 12
    main.run(config, str(work))
    output = capsys.readouterr().out

    model_config, merged = student_params(config, adapters)
    prompt_ids = [smollm2_tokenizer.encode_chat(p)[0] for p in PROMPTS]
    replies = greedy_generate(Llama(model_config), merged, prompt_ids, max_new_tokens=12,
                              eos_id=smollm2_tokenizer.eos_id, pad_id=smollm2_tokenizer.pad_id,
                              batch_size=2)
    expected = "".join(f"user: {prompt}\nassistant: {smollm2_tokenizer.decode(ids)}\n\n"
                       for prompt, ids in zip(PROMPTS, replies))
    assert output == expected


def test_trained_model_names_its_source(tiny_workdir):
    config, work, _ = tiny_workdir
    ctx = stages.Context(config=config, root=work)
    student = modes.load_trained_model(ctx, "student")
    assert student.source == (f"adapters {work / 'students' / config.student_name / 'adapters'} "
                              f"on {ctx.model_path}")
    assert modes.load_trained_model(ctx, "base").source == str(ctx.model_path)


def test_chat_interactive_keeps_context(tiny_workdir, monkeypatch, capsys):
    config, work, _ = tiny_workdir
    config = config.copy_and_resolve_references()
    config.mode = "chat"
    config.chat.model = "base"
    config.chat.max_new_tokens = 4
    monkeypatch.setattr(sys, "stdin",
                        io.StringIO("Hello\n\nAgain\n/rest\n/reset\nHello\n/exit\n"))
    main.run(config, str(work))
    captured = capsys.readouterr()
    output = captured.out
    # The misspelled command reaches the user as an error, not the model as a prompt.
    assert "unknown command /rest" in captured.err
    assert "(new conversation)" in captured.err
    replies = [line for line in output.split("assistant: ")[1:]]
    assert len(replies) == 3
    # After /reset, the same first message gets the same greedy reply.
    assert replies[0].split("user: ")[0] == replies[2].split("user: ")[0]


def test_peft_adapter_as_teacher(tiny_workdir, tmp_path):
    config, work, adapters = tiny_workdir
    config = config.copy_and_resolve_references()
    student_lora = LoraConfig(rank=config.distill.lora_rank, alpha=config.distill.lora_alpha,
                              targets=tuple(config.distill.lora_targets.split(",")))
    export_peft_adapter(tmp_path / "peft", adapters, student_lora)
    config.teacher = str(tmp_path / "peft")
    ctx = stages.Context(config=config, root=work)
    model_config, expected = student_params(config, adapters)

    assert stages.teacher_model_config(ctx) == model_config
    trained = modes.load_trained_model(ctx, "teacher")
    assert trained.lora_config == student_lora
    for params in (stages.teacher_params(ctx), trained.params):
        for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_chat_rejects_bad_settings(tiny_workdir, tmp_path):
    config, work, _ = tiny_workdir
    config = config.copy_and_resolve_references()
    config.mode = "chat"
    config.chat.model = "teacherr"
    with pytest.raises(ValueError, match="config.chat.model='teacherr' is invalid"):
        main.run(config, str(work))
    config.chat.model = "base"
    config.chat.prompts_file = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt' not found"):
        main.run(config, str(work))


def test_stream_sampling_uses_key(tiny_workdir, smollm2_tokenizer):
    config, _, _ = tiny_workdir
    model_config, params = load_hf_checkpoint(config.model)
    model = Llama(model_config)
    prompt = smollm2_tokenizer.encode_chat("Hi")[0]

    def sample(seed, **kwargs):
        return list(stream_generate(model, params, prompt, max_new_tokens=8, eos_id=-1,
                                    rng=jax.random.key(seed), **kwargs))

    assert sample(0, temperature=1.0) == sample(0, temperature=1.0)
    assert sample(0, temperature=1.0) != sample(1, temperature=1.0)
    # A nucleus this small contains only the most likely token: greedy decoding.
    assert sample(3, temperature=1.0, top_p=1e-6) == sample(0)
    with pytest.raises(ValueError, match="needs a jax.random key"):
        list(stream_generate(model, params, prompt, max_new_tokens=2, eos_id=2, temperature=0.5))


def test_stream_decoder_holds_partial_characters(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("café 🙂 ok")
    decoder = StreamDecoder(smollm2_tokenizer)
    pieces = [decoder.add(token_id) for token_id in ids]
    assert "".join(pieces) + decoder.flush() == "café 🙂 ok"
    assert all("\ufffd" not in piece for piece in pieces)


def test_chat_session_system_message(tiny_workdir, smollm2_tokenizer):
    config, _, _ = tiny_workdir
    model_config, params = load_hf_checkpoint(config.model)
    session = ChatSession(Llama(model_config), params, smollm2_tokenizer, system="Be brief.",
                          max_new_tokens=2)
    session.reply("Hi")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


@pytest.mark.slow
def test_chat_answers_prompt_file_on_smollm2(smollm2_gguf_path, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(PROMPTS[0] + "\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "ckt_jax.main", "--config", "configs/smollm2_cpu.py",
         "--workdir", str(tmp_path / "work"), "--config.mode=chat", "--config.chat.model=base",
         f"--config.chat.prompts_file={prompts_file}", "--config.chat.max_new_tokens=24"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    assert result.stdout.startswith(f"user: {PROMPTS[0]}\nassistant: ")
    assert "Paris" in result.stdout


def test_chat_prompts_file_is_directory(tiny_workdir, tmp_path):
    config, work, _ = tiny_workdir
    config = config.copy_and_resolve_references()
    config.mode = "chat"
    config.chat.prompts_file = str(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory; pass a text file"):
        main.run(config, str(work))


@pytest.mark.parametrize("text", ["[]", "{}", '{"config": {}}', '{"config": {"distill": 3}}',
                                  '{"conf'])
def test_chat_malformed_stage_record(tiny_workdir, tmp_path, text):
    config, work, _ = tiny_workdir
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    stage_json = copy / "students" / config.student_name / "stage.json"
    stage_json.write_text(text)
    config = config.copy_and_resolve_references()
    config.mode = "chat"
    config.chat.prompts_file = str(tmp_path / "prompts.txt")
    (tmp_path / "prompts.txt").write_text("Hello\n")
    with pytest.raises(workdir.WorkdirError, match=f"{stage_json}.*delete "):
        main.run(config, str(copy))
