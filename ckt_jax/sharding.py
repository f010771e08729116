"""The device mesh, partition rules for Llama and LoRA parameters, and batch placement.

The mesh has three named axes, outermost first:

    data    data parallelism. Batch rows are split and parameters are replicated.
    fsdp    fully sharded data parallelism. Batch rows are split too, and every large parameter
            is split along its hidden-size dimension D. XLA gathers a weight where a layer uses it.
    tensor  tensor parallelism. Attention heads, MLP columns and the vocabulary are split.

Batch rows are split over `data x fsdp`. A parameter's partition spec follows from its path (see
`PARAM_RULES`); layers sit under `nn.scan`, so their leaves have a leading layer axis that is
never split. Norm scales and the contrastive projection head are small and stay replicated.

Every axis must divide the dimension it splits. `check_model_fits_mesh` and `check_batch_fits_mesh`
say which config value to change before anything is compiled. The mesh uses `Auto` axis types:
XLA propagates shardings through the model, so the model code carries no sharding annotations.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (regular expression on the '/'-joined parameter path, partition spec); the first match wins.
# Shapes: N layers, D hidden, V vocab, I intermediate, r LoRA rank; q/k/v outputs are heads * E.
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    (r"(^|/)embed/embedding$", ("tensor", "fsdp")),                       # [V, D]
    (r"(^|/)lm_head/kernel$", ("fsdp", "tensor")),                        # [D, V]
    (r"(^|/)layers/attn/(q|k|v)/kernel$", (None, "fsdp", "tensor")),      # [N, D, heads * E]
    (r"(^|/)layers/attn/o/kernel$", (None, "tensor", "fsdp")),            # [N, H * E, D]
    (r"(^|/)layers/mlp/(gate|up)/kernel$", (None, "fsdp", "tensor")),     # [N, D, I]
    (r"(^|/)layers/mlp/down/kernel$", (None, "tensor", "fsdp")),          # [N, I, D]
    # A LoRA pair splits like its kernel: lora_a along the kernel's input, lora_b along its output.
    (r"(^|/)layers/attn/(q|k|v)/lora_a$", (None, "fsdp", None)),          # [N, D, r]
    (r"(^|/)layers/attn/(q|k|v)/lora_b$", (None, None, "tensor")),        # [N, r, heads * E]
    (r"(^|/)layers/attn/o/lora_a$", (None, "tensor", None)),              # [N, H * E, r]
    (r"(^|/)layers/attn/o/lora_b$", (None, None, "fsdp")),                # [N, r, D]
    (r"(^|/)layers/mlp/(gate|up)/lora_a$", (None, "fsdp", None)),         # [N, D, r]
    (r"(^|/)layers/mlp/(gate|up)/lora_b$", (None, None, "tensor")),       # [N, r, I]
    (r"(^|/)layers/mlp/down/lora_a$", (None, "tensor", None)),            # [N, I, r]
    (r"(^|/)layers/mlp/down/lora_b$", (None, None, "fsdp")),              # [N, r, D]
    (r"(^|/)(input_norm|post_attn_norm|final_norm)/scale$", ()),          # [N, D] or [D]
    (r"^contrastive_head/", ()),
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, ...]:
    """Return the (data, fsdp, tensor) sizes, with at most one -1 replaced by the remainder."""
    sizes = {"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{name}={size} is invalid; use a positive size, or -1 "
                             "for the devices the other axes leave")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"config.mesh has -1 for {', '.join(rest)}; at most one axis can take "
                         "the remaining devices")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh sizes other than -1 multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; make that product divide {num_devices}")
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = "x".join(str(sizes[name]) for name in AXES)
        raise ValueError(f"config.mesh is {shape}={fixed} devices but {num_devices} are "
                         "available; set one axis to -1 or make the product "
                         f"{num_devices}")
    return tuple(sizes[name] for name in AXES)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh over `devices` (default: every device of every process).

    `jax.make_mesh` defaults to `Explicit` axis types in this JAX version, under which the
    embedding lookup fails to trace, so the mesh is built with `Auto` axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    # create_device_mesh orders TPU devices by their physical topology and GPU devices by id; on
    # CPU it keeps the process-major order of jax.devices().
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_from_config(mesh_config) -> Mesh:
    """Build the mesh from `config.mesh` (fields data, fsdp, tensor)."""
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())


def _axis_size(mesh: Mesh, axis) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[name] for name in names]))


def check_model_fits_mesh(model_config, mesh: Mesh, model_name: str = "model") -> None:
    """Raise a one-line ValueError when a mesh axis does not divide the dimension it splits."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    # num_kv_heads comes first: an axis that divides it also divides num_heads.
    splits = (
        ("tensor", tensor, "num_kv_heads", model_config.num_kv_heads),
        ("tensor", tensor, "num_heads", model_config.num_heads),
        ("tensor", tensor, "intermediate_size", model_config.intermediate_size),
        ("tensor", tensor, "vocab_size", model_config.vocab_size),
        ("fsdp", fsdp, "hidden_size", model_config.hidden_size),
    )
    for axis, size, field, value in splits:
        if value % size:
            divisors = [str(d) for d in range(1, min(value, 64) + 1) if value % d == 0]
            raise ValueError(
                f"config.mesh.{axis}={size} does not divide {field}={value} of the {model_name}; set "
                f"config.mesh.{axis} to a divisor of {value} ({', '.join(divisors)})")


def check_batch_fits_mesh(batch_size: int, mesh: Mesh, accumulation_steps: int = 1,
                          field: str = "batch_size") -> None:
    """Raise a one-line ValueError unless every micro-batch splits evenly over data x fsdp."""
    shards = _axis_size(mesh, BATCH_AXES)
    if batch_size % (shards * accumulation_steps):
        raise ValueError(
            f"config.{field}={batch_size} is not a multiple of mesh data x fsdp ({shards}) x "
            f"config.train.grad_accum_steps ({accumulation_steps}); use a multiple of "
            f"{shards * accumulation_steps}")


def partition_spec(path: Sequence[str], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Return the partition spec of one parameter, checking that each axis divides its dimension."""
    name = "/".join(str(p) for p in path)
    for pattern, spec in PARAM_RULES:
        if re.search(pattern, name):
            break
    else:
        raise ValueError(f"no partition rule matches parameter {name} of shape {tuple(shape)}; "
                         "add one to ckt_jax.sharding.PARAM_RULES")
    if spec and len(spec) != len(shape):
        raise ValueError(f"parameter {name} has shape {tuple(shape)}, but its partition rule "
                         f"{spec} expects {len(spec)} dimensions")
    for axis, dim in zip(spec, shape):
        if axis is not None and dim % _axis_size(mesh, axis):
            raise ValueError(f"config.mesh.{axis}={_axis_size(mesh, axis)} does not divide "
                             f"dimension {dim} of parameter {name} {tuple(shape)}; choose a "
                             f"config.mesh.{axis} that divides {dim}")
    return PartitionSpec(*spec)


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """Return a tree of NamedShardings with the structure of `params` (arrays or shape structs)."""
    flat = traverse_util.flatten_dict(params)
    shardings = {path: NamedSharding(mesh, partition_spec(path, np.shape(value), mesh))
                 for path, value in flat.items()}
    return traverse_util.unflatten_dict(shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over data x fsdp; a spec shorter than an array's rank leaves the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def put(value: Any, sharding: NamedSharding) -> jax.Array:
    """Place one array on the mesh. Every process passes the same full value."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host_value = np.asarray(value)
    return jax.make_array_from_callback(host_value.shape, sharding,
                                        lambda index: host_value[index])


def put_tree(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(put, tree, shardings)


def host_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """Return the sorted batch rows that this process's devices hold under `sharding`.

    Each process reads and pads only these rows of a global batch.
    """
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    return np.asarray(sorted(rows), np.int64)


# Arrays of a packed batch with one row per packed row; the others have one row per example.
PACKED_ROW_KEYS = ("input_ids", "attention_mask", "loss_mask", "segment_ids")


class BatchPlacer:
    """Turn this process's rows of a global batch into global arrays split over data x fsdp.

    With `packed_rows > 0` the batches are packed (`batching.pack_batch_rows`): the arrays of
    `PACKED_ROW_KEYS` have `packed_rows` rows and the per-example arrays `global_batch_size`,
    and each is split over data x fsdp along its own first axis.
    """

    def __init__(self, mesh: Mesh, global_batch_size: int, packed_rows: int = 0):
        self.sharding = batch_sharding(mesh)
        self.global_batch_size = global_batch_size
        self.rows = host_rows(self.sharding, global_batch_size)
        self.packed = BatchPlacer(mesh, packed_rows) if packed_rows else None

    def __call__(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        if self.packed is not None:
            return {key: (self.packed if key in PACKED_ROW_KEYS else self)._put(np.asarray(value))
                    for key, value in local_batch.items()}
        return {key: self._put(np.asarray(value)) for key, value in local_batch.items()}

    def _put(self, local_value: np.ndarray) -> jax.Array:
        if local_value.shape[0] != len(self.rows):
            raise ValueError(f"a local batch array has {local_value.shape[0]} rows, but this "
                             f"process holds {len(self.rows)} rows of the global batch")
        global_shape = (self.global_batch_size,) + local_value.shape[1:]

        def shard(index):
            # Map the global rows of this device's shard to positions in the local array.
            global_rows = np.arange(*index[0].indices(self.global_batch_size))
            local_rows = np.searchsorted(self.rows, global_rows)
            return local_value[local_rows][(slice(None),) + index[1:]]

        return jax.make_array_from_callback(global_shape, self.sharding, shard)
