"""Mesh, partition rules and the sharded train step: one device against 8, and two processes.

Multi-device runs happen in subprocesses (`tests/tiny_training.py`), because the CPU device
count is fixed when JAX starts.
"""

import json
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from jax.sharding import AbstractMesh, PartitionSpec

import tiny_training
from ckt_jax import batching, checkpoint, sharding
from ckt_jax.model import Llama, LlamaConfig, LoraConfig
from ckt_jax.train import make_train_step, to_device_tree, train_loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "tiny_training.py"
MESHES = ("8,1,1", "1,4,2", "2,2,2")
LOSS_TOLERANCE = 1e-5
ADAPTER_TOLERANCE = 1e-4
SMOLLM2_SHAPE = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


def abstract_mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


def flat_numpy(tree) -> dict:
    return {"/".join(path): np.asarray(value)
            for path, value in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def run_script(env, *args, timeout=600):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_run(directory: pathlib.Path) -> tuple[list[float], dict]:
    history = json.loads((directory / "losses.json").read_text())
    with np.load(directory / "adapters.npz") as adapters:
        return [row["loss"] for row in history], {k: adapters[k] for k in adapters.files}


def max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """A 5-step run on one CPU device in this process, with checkpoints of steps 3 and 5.

    The learning-rate schedule does not depend on the step count, so its first 3 steps are the
    3-step run that the other meshes repeat.
    """
    assert jax.device_count() == 1, "run this module in a process with one CPU device"
    setup = tiny_training.build(seed=0, steps=5)
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    directory = tmp_path_factory.mktemp("one_device") / "checkpoints"
    adapters5, history5 = tiny_training.run(
        setup, mesh, checkpoint_dir=directory,
        checkpoint_options=checkpoint.CheckpointOptions(every_steps=3, async_save=False))
    manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
    state3 = manager.restore(3, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    manager.close()
    losses5 = [row["loss"] for row in history5]
    return {"setup": setup, "checkpoint_dir": directory,
            "losses3": losses5[:3], "adapters3": flat_numpy(state3["adapter_params"]),
            "losses5": losses5, "adapters5": flat_numpy(adapters5)}


def test_meshes_match_one_device(one_device, subprocess_env, tmp_path):
    args = ["--out", str(tmp_path), "--steps", "3", "--devices", "8"]
    for mesh in MESHES:
        args += ["--mesh", mesh]
    run_script(subprocess_env, *args)
    for mesh in MESHES:
        losses, adapters = read_run(tmp_path / f"mesh-{mesh.replace(',', 'x')}")
        loss_gap = float(np.max(np.abs(np.subtract(losses, one_device["losses3"]))))
        adapter_gap = max_difference(adapters, one_device["adapters3"])
        print(f"mesh {mesh}: loss difference {loss_gap:.3g}, adapter difference "
              f"{adapter_gap:.3g}")
        assert loss_gap <= LOSS_TOLERANCE, mesh
        assert adapter_gap <= ADAPTER_TOLERANCE, mesh


def test_restore_onto_other_mesh(one_device, subprocess_env, tmp_path):
    # A checkpoint saved on one device resumes on a 2 x 2 x 2 mesh of 8 devices.
    checkpoint_dir = tmp_path / "checkpoints"
    shutil.copytree(one_device["checkpoint_dir"], checkpoint_dir)
    shutil.rmtree(checkpoint_dir / "5")
    result = run_script(subprocess_env, "--out", str(tmp_path / "out"), "--steps", "5",
                        "--devices", "8", "--mesh", "2,2,2", "--checkpoint-dir",
                        str(checkpoint_dir))
    assert "resumed from checkpoint step 3 of 5" in result.stderr
    losses, adapters = read_run(tmp_path / "out" / "mesh-2x2x2")
    assert losses[:3] == one_device["losses3"]  # Read back from metrics.jsonl.
    np.testing.assert_allclose(losses[3:], one_device["losses5"][3:], atol=LOSS_TOLERANCE, rtol=0)
    assert max_difference(adapters, one_device["adapters5"]) <= ADAPTER_TOLERANCE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process(one_device, subprocess_env, tmp_path):
    # Two processes with 2 CPU devices each; every process pads only its own 4 rows of a batch.
    port = free_port()
    processes = []
    for process_id in range(2):
        command = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--steps", "3",
                   "--devices", "2", "--mesh", "2,2,1", "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", "2", "--process-id", str(process_id),
                   "--checkpoint-dir", str(tmp_path / "checkpoints")]
        processes.append(subprocess.Popen(command, cwd=ROOT, env=subprocess_env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-4000:]
    assert "4 rows of each batch of 8 on this process" in stderr
    losses, adapters = read_run(tmp_path / "out" / "mesh-2x2x1")
    loss_gap = float(np.max(np.abs(np.subtract(losses, one_device["losses3"]))))
    adapter_gap = max_difference(adapters, one_device["adapters3"])
    print(f"2 processes: loss difference {loss_gap:.3g}, adapter difference {adapter_gap:.3g}")
    assert loss_gap <= LOSS_TOLERANCE
    assert adapter_gap <= ADAPTER_TOLERANCE
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["2", "3"]


def test_one_device_mesh_matches_plain_jit(one_device):
    # The sharded path on one device reproduces the unsharded step and loop bit for bit.
    setup = one_device["setup"]
    optimizer = setup["optimizer"]
    adapters = to_device_tree(setup["adapters"])
    step_fn = make_train_step(setup["loss_fn"], optimizer)
    batches = batching.balanced_batches(setup["examples"], tiny_training.BATCH_SIZE, 0.5, seed=0,
                                        pad_id=0, max_seq_len=32, pad_multiple=32)
    adapters, _, history = train_loop(
        step_fn=step_fn, adapter_params=adapters, opt_state=optimizer.init(adapters),
        frozen_params=to_device_tree(setup["frozen"]), batches=batches, num_steps=3,
        rng=jax.random.PRNGKey(7))
    assert [row["loss"] for row in history] == one_device["losses3"]
    for path, value in flat_numpy(adapters).items():
        assert np.array_equal(value, one_device["adapters3"][path]), path


def test_mesh_shape_errors():
    assert sharding.resolve_mesh_shape(-1, 2, 1, 8) == (4, 2, 1)
    cases = [
        ((3, 1, 1, 8), "config.mesh is 3x1x1=3 devices but 8 are available"),
        ((-1, -1, 1, 8), "config.mesh has -1 for data, fsdp"),
        ((-1, 3, 1, 8), "does not divide the 8 devices"),
        ((0, 1, 1, 8), "config.mesh.data=0 is invalid"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            sharding.resolve_mesh_shape(*args)


def test_model_mesh_mismatch_message():
    with pytest.raises(ValueError) as error:
        sharding.check_model_fits_mesh(SMOLLM2_SHAPE, abstract_mesh(1, 1, 2), "student")
    assert str(error.value) == ("config.mesh.tensor=2 does not divide num_kv_heads=3 of the "
                                "student; set config.mesh.tensor to a divisor of 3 (1, 3)")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="config.mesh.fsdp=5 does not divide hidden_size=576"):
        sharding.check_model_fits_mesh(SMOLLM2_SHAPE, abstract_mesh(1, 5, 1))
    sharding.check_model_fits_mesh(SMOLLM2_SHAPE, abstract_mesh(2, 4, 3))


def test_batch_mesh_mismatch_message():
    with pytest.raises(ValueError, match=r"config.batch_size=6 is not a multiple of mesh data x "
                                         r"fsdp \(4\) x config.train.grad_accum_steps \(2\)"):
        sharding.check_batch_fits_mesh(6, abstract_mesh(2, 2, 2), accumulation_steps=2)
    sharding.check_batch_fits_mesh(8, abstract_mesh(2, 2, 2), accumulation_steps=2)


def test_partition_rules_cover_every_leaf():
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False)
    model = Llama(config, lora=LoraConfig(rank=4, targets=("q", "k", "v", "o", "gate", "up",
                                                           "down")))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    flat = traverse_util.flatten_dict(shapes["params"])
    flat[("contrastive_head", "Dense_0", "kernel")] = jax.ShapeDtypeStruct((32, 32), jnp.float32)

    mesh = abstract_mesh(2, 2, 2)
    specs = {"/".join(p): sharding.partition_spec(p, v.shape, mesh) for p, v in flat.items()}
    expected = {
        "embed/embedding": PartitionSpec("tensor", "fsdp"),
        "lm_head/kernel": PartitionSpec("fsdp", "tensor"),
        "layers/attn/k/kernel": PartitionSpec(None, "fsdp", "tensor"),
        "layers/attn/o/kernel": PartitionSpec(None, "tensor", "fsdp"),
        "layers/attn/o/lora_a": PartitionSpec(None, "tensor", None),
        "layers/attn/q/lora_b": PartitionSpec(None, None, "tensor"),
        "layers/mlp/down/kernel": PartitionSpec(None, "tensor", "fsdp"),
        "layers/mlp/down/lora_b": PartitionSpec(None, None, "fsdp"),
        "layers/mlp/up/lora_a": PartitionSpec(None, "fsdp", None),
        "layers/input_norm/scale": PartitionSpec(),
        "final_norm/scale": PartitionSpec(),
        "contrastive_head/Dense_0/kernel": PartitionSpec(),
    }
    for name, spec in expected.items():
        assert specs[name] == spec, name

    # A teacher or backbone tree nests the same paths under a prefix.
    assert sharding.partition_spec(("teacher", "embed", "embedding"), (96, 32),
                                   mesh) == PartitionSpec("tensor", "fsdp")

    with pytest.raises(ValueError, match="no partition rule matches parameter extra/w"):
        sharding.partition_spec(("extra", "w"), (4,), mesh)
    with pytest.raises(ValueError, match="config.mesh.tensor=2 does not divide dimension 97"):
        sharding.partition_spec(("embed", "embedding"), (97, 32), mesh)


def test_optimizer_state_follows_params():
    from ckt_jax import lora
    from ckt_jax.train import opt_state_shardings

    setup = {"layers": {"attn": {"q": {"lora_a": np.zeros((2, 32, 4), np.float32),
                                       "lora_b": np.zeros((2, 4, 32), np.float32)}}}}
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    adapter_shardings = sharding.param_shardings(setup, mesh)
    optimizer = lora.make_adapter_optimizer(1e-3)
    state_shardings = opt_state_shardings(optimizer, setup, adapter_shardings, mesh)
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state_shardings)[0]:
        specs[jax.tree_util.keystr(path)] = leaf.spec
    moments = {k: v for k, v in specs.items() if ".mu[" in k or ".nu[" in k}
    assert len(moments) == 4
    for key, spec in moments.items():
        expected = (PartitionSpec(None, "fsdp", None) if "lora_a" in key
                    else PartitionSpec(None, None, "tensor"))
        assert spec == expected, key
    counters = [v for k, v in specs.items() if k.endswith(".count")]
    assert counters and all(spec == PartitionSpec() for spec in counters)
