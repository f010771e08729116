"""The ckt_jax side of `bench/train_step.py`: a worker process that runs ckt_jax's train step.

The parent starts it as `python bench/jax_worker.py` and sends it JSON-line requests
(`common.serve`). It loads the model and writes the files from which the PyTorch worker builds
the same model. These are the batch and the initial adapters of the teacher and the student as
PEFT directories, plus for the tiny model the weights as a Hugging Face directory. Then it
compiles and times `ckt_jax.train.make_train_step` on `ckt_jax.objective.build_objective` for
each compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ckt_jax import xla_flags  # noqa: E402

# The same XLA flags as `python -m ckt_jax.main`, before JAX starts its CPU backend.
xla_flags.apply_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

import common  # noqa: E402
from ckt_jax import export, lora, losses, model, peft_format, train  # noqa: E402
from ckt_jax.loading import find_smollm2_gguf, load_gguf  # noqa: E402
from ckt_jax.model import Llama, LlamaConfig, LoraConfig  # noqa: E402
from ckt_jax.objective import ObjectiveConfig, build_objective  # noqa: E402

TINY_CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                          max_position_embeddings=4096)
COMPUTE_DTYPES = ("float32", "bfloat16")


def tiny_params(config: LlamaConfig, seed: int) -> dict:
    """Draw random weights that keep activations near unit scale, in `ckt_jax.model`'s layout.

    Kernels are N(0, 1/fan_in), so the teacher's adapters change the logits noticeably, and
    embeddings N(0, 1/hidden), so the logits of the tied output projection are near unit scale.
    Norm scales are U(0.5, 1.5). Returns float32 NumPy arrays.
    """
    shapes = jax.eval_shape(lambda: Llama(config).init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, 4), jnp.int32))["params"])
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "scale":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif path[-1] == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(leaf.shape[-2]), leaf.shape)
        else:
            value = rng.normal(0.0, 1.0 / np.sqrt(config.hidden_size), leaf.shape)
        flat[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def random_adapters(config: LlamaConfig, lora_config: LoraConfig, seed: int,
                    lora_b_std: float) -> dict:
    """ckt_jax's initial adapters with `lora_b` drawn from N(0, lora_b_std) instead of zeros."""
    adapters = lora.init_adapter_params(
        lambda r: Llama(config, lora=lora_config).init(r, jnp.zeros((1, 4), jnp.int32))["params"],
        jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(jax.device_get(adapters))
    for path, value in flat.items():
        if path[-1] == "lora_b":
            flat[path] = rng.normal(0.0, lora_b_std, value.shape).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


class JaxWorker:
    def __init__(self):
        self.config: LlamaConfig | None = None
        self.lora_config = LoraConfig(rank=common.LORA_RANK, alpha=common.LORA_ALPHA,
                                      targets=common.LORA_TARGETS)
        self.variants: dict[str, dict] = {}

    # ---- requests ------------------------------------------------------------------------

    def prepare(self, request: dict) -> dict:
        """Load the model, build the teacher and adapters, and write the PyTorch side's files."""
        start = time.perf_counter()
        workdir = pathlib.Path(request["workdir"])
        seed = request["seed"]
        files = {}
        if request["model"] == "tiny":
            config, params = TINY_CONFIG, tiny_params(TINY_CONFIG, seed)
            files["hf_dir"] = str(export.export_hf_directory(workdir / "base_hf", config, params,
                                                             tokenizer=None))
        else:
            path = find_smollm2_gguf()
            config, params = load_gguf(path)
            files["gguf"] = str(path)
        if request["seq_len"] > config.max_position_embeddings:
            raise ValueError(f"--seq-len={request['seq_len']} exceeds the model's "
                             f"{config.max_position_embeddings} positions; pass a shorter one")
        self.config = config

        self.student_adapters = random_adapters(config, self.lora_config, seed + 2,
                                                common.STUDENT_LORA_B_STD)
        files["student_lora"] = str(peft_format.export_peft_adapter(
            workdir / "student_lora", self.student_adapters, self.lora_config))
        self.backbone = train.to_device_tree(params)
        del params

        # The teacher is a second full copy of the weights, built only when an objective needs it.
        self.teacher = None
        if request["teacher"]:
            teacher_adapters = random_adapters(config, self.lora_config, seed + 1,
                                               common.TEACHER_LORA_B_STD)
            files["teacher_lora"] = str(peft_format.export_peft_adapter(
                workdir / "teacher_lora", teacher_adapters, self.lora_config))
            self.teacher = lora.merge_lora(
                lora.combine_params(train.to_device_tree(teacher_adapters), self.backbone),
                self.lora_config.scale)
        batch = common.make_batch(request["batch"], request["seq_len"], config.vocab_size, seed)
        files["batch"] = str(workdir / "batch.npz")
        np.savez(files["batch"], **batch)
        self.batch = {name: jnp.asarray(value) for name, value in batch.items()}
        return {"config": dataclasses.asdict(config), "files": files,
                "load_seconds": time.perf_counter() - start, "versions": versions()}

    def peaks(self, request: dict) -> dict:
        """Measure the best GFLOP/s of square matrix products in NumPy and JAX."""
        size, repeats = request["size"], request["repeats"]
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), np.float32)
        b = rng.standard_normal((size, size), np.float32)
        result = {"numpy_float32": common.matmul_gflops(
            size, common.best_seconds(lambda: a @ b, repeats))}
        # The model's products: operands in the compute dtype, accumulated and returned in
        # float32 (`ckt_jax.model.matmul`). The second bfloat16 product returns bfloat16, a form
        # that XLA's CPU backend computes in float32 after converting both operands.
        products = {f"jax_{dtype}": (dtype, jax.jit(functools.partial(model.matmul, "ij,jk->ik",
                                                                      dtype=dtype)))
                    for dtype in COMPUTE_DTYPES}
        products["jax_bfloat16_out"] = ("bfloat16", jax.jit(jnp.matmul))
        for name, (dtype, product) in products.items():
            x, y = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
            seconds = common.best_seconds(lambda: product(x, y).block_until_ready(), repeats)
            result[name] = common.matmul_gflops(size, seconds)
        return result

    def setup(self, request: dict) -> dict:
        """Build and warm up one train step per compute dtype of `request["variants"]`.

        Every variant starts from the same initial adapters, and its first step uses the key
        `fold_in(PRNGKey(seed), 0)`, so its loss is the loss of the initial adapters on the
        batch. When the objective has a noisy pass, the noise of that first step is written
        to `request["noise_path"]` for the PyTorch side's loss check.
        """
        self.release({})
        objective = ObjectiveConfig(**request["settings"])
        self.key = jax.random.PRNGKey(request["seed"])
        self.scan_layers = request.get("scan_layers", False)
        self.remat = request.get("remat", "none")
        if objective.consistency_weight > 0:
            np.save(request["noise_path"], self.first_step_noise(objective))
        answers = {}
        for name in request["variants"]:
            if name not in COMPUTE_DTYPES:
                raise ValueError(f"compute dtype {name!r} is unknown; use one of "
                                 f"{', '.join(COMPUTE_DTYPES)}")
            self.variants[name] = self.build_variant(objective, name)
            warmup = [self.run_step(name) for _ in range(request["warmup"])]
            answers[name] = {"warmup": warmup, "first_loss": warmup[0]["loss"],
                             "first_terms": warmup[0]["terms"]}
        return answers

    def step(self, request: dict) -> dict:
        return self.run_step(request["variant"])

    def release(self, request: dict) -> dict:
        """Drop the compiled steps and their state, so the next objective starts clean."""
        self.variants.clear()
        jax.clear_caches()
        gc.collect()
        return {"ok": True}

    # ---- internals -----------------------------------------------------------------------

    def build_variant(self, objective: ObjectiveConfig, compute: str) -> dict:
        precision = train.Precision(compute=compute)
        kwargs = dict(dtype=precision.compute_dtype, param_dtype=precision.param_dtype,
                      output_dtype=precision.output_dtype, scan_layers=self.scan_layers,
                      remat=self.remat != "none",
                      remat_policy="full" if self.remat == "none" else self.remat)
        student = Llama(self.config, lora=self.lora_config, **kwargs)
        teacher = Llama(self.config, **kwargs) if objective.needs_teacher else None
        loss_fn = build_objective(student, teacher, objective)
        optimizer = lora.make_adapter_optimizer(common.LEARNING_RATE,
                                                max_grad_norm=common.MAX_GRAD_NORM)
        adapters = train.to_device_tree(self.student_adapters)
        frozen = {"backbone": self.backbone}
        if objective.needs_teacher:
            if self.teacher is None:
                raise ValueError("this objective needs a teacher, but prepare ran with "
                                 "teacher=False")
            frozen["teacher"] = self.teacher
        return {"step": train.make_train_step(loss_fn, optimizer), "adapters": adapters,
                "opt_state": optimizer.init(adapters), "frozen": frozen, "index": 0}

    def run_step(self, name: str) -> dict:
        variant = self.variants[name]
        rng = jax.random.fold_in(self.key, variant["index"])
        variant["index"] += 1

        def run():
            adapters, opt_state, metrics = variant["step"](
                variant["adapters"], variant["opt_state"], variant["frozen"], self.batch, rng)
            jax.block_until_ready((adapters, opt_state))
            variant["adapters"], variant["opt_state"] = adapters, opt_state
            metrics = jax.device_get(metrics)
            return {"loss": float(metrics["loss"]),
                    "terms": {key.split("/", 1)[1]: float(value)
                              for key, value in metrics.items() if key.startswith("loss/")}}

        return common.measure_step(run)

    def first_step_noise(self, objective: ObjectiveConfig) -> np.ndarray:
        """Return the embedding noise of the first step's noisy pass, float32 `rows x L x D`.

        NOTE: this repeats how `build_objective`'s loss splits its key (the noise key is the
        first half of the step key's first split) and which rows get the noisy pass. If that
        changes, the first losses of the two sides stop agreeing and the check reports it.
        """
        noise_key, _ = jax.random.split(jax.random.fold_in(self.key, 0))
        rows = slice(None, None, objective.consistency_row_stride)
        mask = self.batch["attention_mask"][rows]
        shape = mask.shape + (self.config.hidden_size,)
        noise = losses.length_scaled_noise(noise_key, jnp.zeros(shape, jnp.float32), mask,
                                           objective.noise_alpha, objective.noise_distribution)
        return np.asarray(noise)


def versions() -> dict:
    import flax
    import jaxlib
    import optax

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__,
            "jax_devices": [str(device) for device in jax.devices()]}


def main() -> None:
    worker = JaxWorker()
    common.serve({"prepare": worker.prepare, "peaks": worker.peaks, "setup": worker.setup,
                  "step": worker.step, "release": worker.release})


if __name__ == "__main__":
    main()
