"""Llama-architecture decoder in Flax linen, with optional LoRA adapters and a KV cache.

Parameter layout (loaders, LoRA splitting and checkpoints depend on it)::

    embed/embedding                      [V, D]
    layers/input_norm/scale              [N, D]
    layers/attn/{q,k,v}/kernel           [N, D, H*hd] (k, v: [N, D, KV*hd])
    layers/attn/{q,k,v}/bias             [N, H*hd] (k, v: [N, KV*hd]), only when listed in
                                         ``LlamaConfig.projection_biases`` (Qwen2: q, k, v)
    layers/attn/o/kernel                 [N, H*hd, D]
    layers/post_attn_norm/scale          [N, D]
    layers/mlp/{gate,up}/kernel          [N, D, I]
    layers/mlp/down/kernel               [N, I, D]
    final_norm/scale                     [D]
    lm_head/kernel                       [D, V]   (only when embeddings are untied)

Kernels are stored (in, out), the transpose of a PyTorch ``weight``. With LoRA enabled, each
targeted projection also contains ``lora_a`` [N, in, r] and ``lora_b`` [N, r, out]. Any projection
named in ``projection_biases`` has a ``bias`` [N, out].

The same module runs the Llama 3, Qwen2 and Mistral variants of the architecture: Llama 3 scales
the rotary frequencies (``RopeScaling``), Qwen2 adds biases to the q, k and v projections, and
Mistral may limit attention to a sliding window of recent tokens.

Shape suffixes: B batch, L query length, S cache length, D hidden, V vocab, H query heads,
K key/value heads, G query heads per key/value head, E head_dim, I intermediate, N layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PROJECTIONS = LORA_TARGETS
ROPE_SCALING_TYPES = ("linear", "llama3")

# Added to masked attention scores instead of -inf, so that a query row whose keys are all
# masked (a left-padding position) gets a uniform softmax instead of NaN.
_MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling for contexts longer than the pretraining context.

    ``linear`` divides every inverse frequency by ``factor``. ``llama3`` (Llama 3.1 and later)
    divides only the low frequencies: wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are divided by ``factor``, those
    shorter than ``original_max_position_embeddings / high_freq_factor`` are kept, and the band
    in between is interpolated linearly in ``original_max_position_embeddings / wavelength``.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"RopeScaling.rope_type={self.rope_type!r} is not supported; use one "
                             f"of {ROPE_SCALING_TYPES}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"RopeScaling.high_freq_factor={self.high_freq_factor} must exceed "
                f"low_freq_factor={self.low_freq_factor} for rope_type 'llama3'")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    rope_scaling: RopeScaling | None = None
    # Projections that add a bias after the matrix product (Qwen2: ("q", "k", "v")).
    projection_biases: tuple[str, ...] = ()
    # Tokens a query may attend to, itself included (Mistral); None attends to all earlier tokens.
    sliding_window: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}; grouped-query attention needs "
                "num_heads = num_kv_heads * group size")
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig.head_dim={self.head_dim} is odd; rotary embeddings rotate pairs "
                "of channels, so use an even head_dim")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        object.__setattr__(self, "projection_biases", tuple(self.projection_biases))
        unknown = [name for name in self.projection_biases if name not in PROJECTIONS]
        if unknown:
            raise ValueError(f"LlamaConfig.projection_biases has unknown names {unknown}; choose "
                             f"from {PROJECTIONS}")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"LlamaConfig.sliding_window must be None or a positive int, got "
                             f"{self.sliding_window!r}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings: each target computes ``x @ W + (alpha / rank) * (x @ A) @ B``."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.targets, str):
            raise ValueError(
                f"LoraConfig.targets must be a tuple of names, got the string {self.targets!r}; "
                f"write targets=({self.targets!r},)")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError(f"LoraConfig.targets is empty; choose from {LORA_TARGETS}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown:
            raise ValueError(f"LoraConfig.targets has unknown names {unknown}; "
                             f"choose from {LORA_TARGETS}")
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoraConfig.targets has duplicates: {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LlamaOutput(NamedTuple):
    logits_BxLxV: jax.Array  # in Llama.output_dtype (float32 by default) for any compute dtype
    hidden_BxLxD: jax.Array  # after the final RMSNorm, i.e. the input of the LM head
    cache: Any  # updated KV cache, or None when called without one


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
    """Create an empty KV cache for ``max_len`` token slots per row.

    Keys: ``k``/``v`` [N, B, S, K, E] in ``dtype``; ``mask`` [B, S] bool, True where a slot
    contains a real (non-padding) token; ``index`` int32 scalar, the next slot to write (shared by
    all rows, which is why prompts are left-padded).
    """
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch_size, max_len), jnp.bool_),
        "index": jnp.zeros((), jnp.int32),
    }


def _rms_norm(x, scale, eps, dtype):
    """RMSNorm computed in float32, whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(variance + eps) * scale.astype(jnp.float32)).astype(dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return _rms_norm(x, scale, self.eps, self.dtype)


def _lora_a_init(key, shape, dtype):
    # Uniform(-1/sqrt(in), 1/sqrt(in)): the bound that PEFT's default kaiming_uniform(a=sqrt(5))
    # gives. B starts at zero, so a fresh adapter leaves the model's output unchanged.
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32_accumulate(spec: str, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_accumulate_fwd(spec, a, b):
    return _einsum_f32_accumulate(spec, a, b), (a, b)


def _einsum_f32_accumulate_bwd(spec, residuals, grad):
    a, b = residuals
    inputs, out = spec.split("->")
    a_spec, b_spec = inputs.split(",")
    # Both gradient products take operands in the compute dtype and accumulate in float32, like
    # the forward product. Differentiating the forward einsum directly would pair the float32
    # cotangent with a bfloat16 operand, and XLA's CPU backend runs such a mixed product in
    # float32 after converting both operands.
    grad = grad.astype(a.dtype)
    grad_a = jnp.einsum(f"{out},{b_spec}->{a_spec}", grad, b, preferred_element_type=jnp.float32)
    grad_b = jnp.einsum(f"{a_spec},{out}->{b_spec}", a, grad, preferred_element_type=jnp.float32)
    return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_einsum_f32_accumulate.defvjp(_einsum_f32_accumulate_fwd, _einsum_f32_accumulate_bwd)


def matmul(spec: str, a, b, dtype):
    """``einsum(spec, a, b)`` with both operands cast to ``dtype``, accumulated in float32.

    Returns float32. The spec names every index explicitly (no ellipsis) and sums no index
    that appears in only one operand. The backward products take their operands in ``dtype``
    too: a bfloat16 product with a float32 result is the form that XLA's CPU backend hands to
    its bfloat16 matrix kernels, while any other bfloat16 product runs in float32. Each
    gradient is one einsum over the operands as stored. Differentiating the forward einsum
    instead makes XLA's CPU backend transpose the cotangent for the weight-gradient product
    of a LoRA pair: in the CPU config's float32 distill step those copies took 5.8 of 15.3
    busy thread-seconds per step (`docs/performance.md`).
    """
    return _einsum_f32_accumulate(spec, a.astype(dtype), b.astype(dtype))


def _dense_spec(ndim: int) -> str:
    """Return the einsum spec of ``x @ kernel`` for an ``ndim``-dim ``x`` ("abz,zy->aby")."""
    batch = "abcdefgh"[:ndim - 1]
    return f"{batch}z,zy->{batch}y"


class Projection(nn.Module):
    """Dense layer ``x @ kernel`` (plus ``bias`` if ``use_bias``) with an optional LoRA update."""

    features: int
    lora: LoraConfig | None
    dtype: Any
    param_dtype: Any
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(0.02),
                            (in_features, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        spec = _dense_spec(x.ndim)
        y = matmul(spec, x, kernel, self.dtype).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.lora is not None:
            lora_a = self.param("lora_a", _lora_a_init, (in_features, self.lora.rank),
                                self.param_dtype)
            lora_b = self.param("lora_b", nn.initializers.zeros, (self.lora.rank, self.features),
                                self.param_dtype)
            down = matmul(spec, x, lora_a, self.dtype).astype(self.dtype)
            update = matmul(spec, down, lora_b, self.dtype).astype(self.dtype)
            y = y + (self.lora.scale * update).astype(self.dtype)
        return y


def _rotate_half(x):
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def _scaled_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse rotary frequencies [E/2] under ``scaling``, computed in float64 on the host."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    context = scaling.original_max_position_embeddings
    wavelength = 2.0 * math.pi / inv_freq
    smooth = ((context / wavelength - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    interpolated = (1.0 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelength < context / scaling.high_freq_factor, inv_freq, interpolated)
    scaled = np.where(wavelength > context / scaling.low_freq_factor, inv_freq / scaling.factor,
                      scaled)
    return scaled.astype(np.float32)


def rope_cos_sin(positions_BxL, head_dim: int, theta: float,
                 scaling: RopeScaling | None = None):
    """Rotary cos/sin tables [B, L, E] (rotate-half layout, as in Hugging Face Llama)."""
    if scaling is None:
        inv_freq_E2 = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    else:
        inv_freq_E2 = jnp.asarray(_scaled_inverse_frequencies(head_dim, theta, scaling))
    angles_BxLxE2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_E2
    angles_BxLxE = jnp.concatenate([angles_BxLxE2, angles_BxLxE2], axis=-1)
    return jnp.cos(angles_BxLxE), jnp.sin(angles_BxLxE)


def _apply_rope(x_BxLxHxE, cos_BxLxE, sin_BxLxE):
    x32 = x_BxLxHxE.astype(jnp.float32)
    cos = cos_BxLxE[:, :, None, :]
    sin = sin_BxLxE[:, :, None, :]
    return (x32 * cos + _rotate_half(x32) * sin).astype(x_BxLxHxE.dtype)


class _Projected(nn.Module):
    """Base of the attention and MLP blocks: builds their linear projections."""

    config: LlamaConfig
    lora: LoraConfig | None
    dtype: Any
    param_dtype: Any

    def _projection(self, name, features):
        lora = self.lora if self.lora is not None and name in self.lora.targets else None
        return Projection(features, lora, self.dtype, self.param_dtype,
                          use_bias=name in self.config.projection_biases, name=name)


class Attention(_Projected):
    """Grouped-query self-attention with rotary positions and an optional KV cache."""

    @nn.compact
    def __call__(self, x_BxLxD, allowed_new_BxLxL, allowed_cached_BxLxS, cos_BxLxE,
                 sin_BxLxE, layer_cache):
        cfg = self.config
        B, L, _ = x_BxLxD.shape
        H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        G = H // K

        q_BxLxHxE = self._projection("q", H * E)(x_BxLxD).reshape(B, L, H, E)
        k_BxLxKxE = self._projection("k", K * E)(x_BxLxD).reshape(B, L, K, E)
        v_BxLxKxE = self._projection("v", K * E)(x_BxLxD).reshape(B, L, K, E)
        q_BxLxHxE = _apply_rope(q_BxLxHxE, cos_BxLxE, sin_BxLxE)
        k_BxLxKxE = _apply_rope(k_BxLxKxE, cos_BxLxE, sin_BxLxE)

        # Grouped-query attention: query head h uses key/value head h // G. Scores against the
        # cached keys and against the L new keys are computed separately and share one softmax,
        # so the cache is never copied here. The caller writes the new keys into the cache
        # after the layer scan.
        q_BxLxKxGxE = q_BxLxHxE.reshape(B, L, K, G, E)
        scale = 1.0 / math.sqrt(E)
        scores_BxKxGxLxL = matmul("blkge,bmke->bkglm", q_BxLxKxGxE, k_BxLxKxE,
                                  self.dtype) * scale
        scores_BxKxGxLxL = jnp.where(allowed_new_BxLxL[:, None, None], scores_BxKxGxLxL,
                                     _MASK_VALUE)
        if layer_cache is None or allowed_cached_BxLxS is None:
            # No cache, or an empty one (a prefill): attend to the new tokens only.
            probs_BxKxGxLxL = jax.nn.softmax(scores_BxKxGxLxL, axis=-1).astype(self.dtype)
            out_BxLxKxGxE = matmul("bkglm,bmke->blkge", probs_BxKxGxLxL, v_BxLxKxE,
                                   self.dtype).astype(self.dtype)
        else:
            cached_k_BxSxKxE, cached_v_BxSxKxE = layer_cache
            S = cached_k_BxSxKxE.shape[1]
            scores_BxKxGxLxS = jnp.einsum(
                "blkge,bske->bkgls", q_BxLxKxGxE, cached_k_BxSxKxE.astype(self.dtype),
                preferred_element_type=jnp.float32) * scale
            scores_BxKxGxLxS = jnp.where(allowed_cached_BxLxS[:, None, None], scores_BxKxGxLxS,
                                         _MASK_VALUE)
            scores_BxKxGxLxT = jnp.concatenate([scores_BxKxGxLxS, scores_BxKxGxLxL], axis=-1)
            probs_BxKxGxLxT = jax.nn.softmax(scores_BxKxGxLxT, axis=-1).astype(self.dtype)
            out_BxLxKxGxE = (
                jnp.einsum("bkgls,bske->blkge", probs_BxKxGxLxT[..., :S],
                           cached_v_BxSxKxE.astype(self.dtype))
                + jnp.einsum("bkglm,bmke->blkge", probs_BxKxGxLxT[..., S:], v_BxLxKxE))
        new_kv = None
        if layer_cache is not None:
            cache_dtype = layer_cache[0].dtype
            new_kv = (k_BxLxKxE.astype(cache_dtype), v_BxLxKxE.astype(cache_dtype))
        out_BxLxD = self._projection("o", cfg.hidden_size)(out_BxLxKxGxE.reshape(B, L, H * E))
        return out_BxLxD, new_kv


class MLP(_Projected):
    """SwiGLU feed-forward block."""

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.config
        gate_BxLxI = self._projection("gate", cfg.intermediate_size)(x_BxLxD)
        up_BxLxI = self._projection("up", cfg.intermediate_size)(x_BxLxD)
        return self._projection("down", cfg.hidden_size)(nn.silu(gate_BxLxI) * up_BxLxI)


class DecoderLayer(nn.Module):
    """One pre-norm decoder block, written as an ``nn.scan`` body: (carry, xs) -> (carry, ys)."""

    config: LlamaConfig
    lora: LoraConfig | None
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, hidden_BxLxD, layer_cache, allowed_new_BxLxL, allowed_cached_BxLxS,
                 cos_BxLxE, sin_BxLxE):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name=name)
        attn_out_BxLxD, new_kv = Attention(cfg, self.lora, self.dtype, self.param_dtype,
                                           name="attn")(
            norm("input_norm")(hidden_BxLxD), allowed_new_BxLxL, allowed_cached_BxLxS, cos_BxLxE,
            sin_BxLxE, layer_cache)
        hidden_BxLxD = hidden_BxLxD + attn_out_BxLxD
        mlp_out_BxLxD = MLP(cfg, self.lora, self.dtype, self.param_dtype, name="mlp")(
            norm("post_attn_norm")(hidden_BxLxD))
        hidden_BxLxD = hidden_BxLxD + mlp_out_BxLxD
        return hidden_BxLxD, new_kv


# Rematerialization policies by name: which intermediate values of a layer the backward pass keeps
# instead of recomputing. "full" keeps only the layer inputs (least memory, most recomputation).
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _layer_stack(config: LlamaConfig, remat: bool, remat_policy: str, scan: bool = True):
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={remat_policy!r} is unknown; use one of "
                         f"{', '.join(REMAT_POLICIES)}")
    layer_cls = DecoderLayer
    if remat:
        layer_cls = nn.remat(DecoderLayer, prevent_cse=False,
                             policy=REMAT_POLICIES[remat_policy])
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        # The carry is the hidden state and layer_cache is scanned over its leading layer axis.
        # The masks and rotary tables are shared by all layers.
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=config.num_layers,
        unroll=config.num_layers if not scan else 1,
    )


def segment_positions(segment_ids_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """Rotary positions `B x L` of packed rows: real tokens before each one in its segment.

    Every segment starts at position 0, as it would alone. Within a segment only relative
    positions reach attention under rotary embeddings, so this matters for float rounding at
    large offsets and for the positions a model saw in pretraining, not for exact arithmetic.
    """
    L = segment_ids_BxL.shape[1]
    same_segment_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    earlier_BxLxL = (same_segment_BxLxL & mask_BxL.astype(jnp.bool_)[:, None, :]
                     & jnp.tril(jnp.ones((L, L), jnp.bool_), -1)[None])
    return jnp.sum(earlier_BxLxL, axis=-1, dtype=jnp.int32)


class Llama(nn.Module):
    config: LlamaConfig
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: bool = False  # rematerialize each layer in the backward pass (jax.checkpoint)
    remat_policy: str = "full"  # what a rematerialized layer keeps: a key of REMAT_POLICIES
    # Run the layers as a loop over the stacked layer weights (True), or unroll that loop into
    # straight-line code (False). Both keep the same parameters. A loop compiles one layer
    # and suits deep models on accelerators. Unrolled compiles every layer, but on XLA's CPU
    # backend it avoids writing each layer's bfloat16 residuals into a stacked buffer, which
    # that backend does by converting the whole buffer to float32 and back at every layer.
    scan_layers: bool = True
    output_dtype: Any = jnp.float32  # dtype of the logits

    def setup(self):
        cfg = self.config
        self.embedder = nn.Embed(cfg.vocab_size, cfg.hidden_size,
                                 embedding_init=nn.initializers.normal(0.02),
                                 dtype=self.dtype, param_dtype=self.param_dtype, name="embed")
        self.layer_stack = _layer_stack(cfg, self.remat, self.remat_policy, self.scan_layers)(
            cfg, self.lora, self.dtype, self.param_dtype, name="layers")
        self.final_norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype,
                                  name="final_norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = Projection(cfg.vocab_size, None, self.dtype, self.param_dtype,
                                      name="lm_head")

    def embed(self, input_ids_BxL):
        """Look up token embeddings [B, L, D] in the compute dtype."""
        return self.embedder(input_ids_BxL)

    def project(self, hidden_BxLxD):
        """Apply the output projection (tied embedding or ``lm_head``); logits in ``output_dtype``.

        Callable on its own (``method="project"``) to score a few positions of the final hidden
        states instead of all of them.
        """
        if self.config.tie_word_embeddings:
            logits_BxLxV = matmul("bld,vd->blv", hidden_BxLxD, self.embedder.embedding,
                                  self.dtype)
        else:
            logits_BxLxV = self.lm_head(hidden_BxLxD)
        return logits_BxLxV.astype(self.output_dtype)

    def __call__(self, input_ids_BxL=None, *, inputs_embeds_BxLxD=None, attention_mask_BxL=None,
                 positions_BxL=None, cache=None, cache_is_empty=False,
                 segment_ids_BxL=None) -> LlamaOutput:
        """Run the decoder.

        Pass exactly one of ``input_ids_BxL`` or ``inputs_embeds_BxLxD``. ``attention_mask_BxL``
        is 1 for real tokens and 0 for padding (left or right); it defaults to all ones.
        Positions default to the number of real tokens before each one, counting tokens already
        in ``cache``, so left padding does not shift them. With ``cache`` (from ``init_cache``),
        the L new tokens go to slots ``index .. index + L - 1``, and the returned cache has
        ``index`` advanced by L. ``cache_is_empty=True`` (a Python bool) promises that ``cache``
        is fresh from ``init_cache``, so a prefill skips attention over its empty slots.

        ``segment_ids_BxL`` packs several sequences into one row: a token attends only to
        earlier tokens with the same id, and the default positions count only those tokens, so
        rotary positions restart at 0 in every segment. Segments must be contiguous within a
        row. It cannot be combined with ``cache``.
        """
        if (input_ids_BxL is None) == (inputs_embeds_BxLxD is None):
            raise ValueError("Llama: pass exactly one of input_ids_BxL or inputs_embeds_BxLxD "
                             f"(got input_ids={'set' if input_ids_BxL is not None else 'None'}, "
                             f"inputs_embeds={'set' if inputs_embeds_BxLxD is not None else 'None'})")
        if input_ids_BxL is not None:
            if input_ids_BxL.ndim != 2:
                raise ValueError(f"input_ids_BxL must be 2-D [batch, length], got shape "
                                 f"{input_ids_BxL.shape}")
            hidden_BxLxD = self.embed(input_ids_BxL)
        else:
            expected = self.config.hidden_size
            if inputs_embeds_BxLxD.ndim != 3 or inputs_embeds_BxLxD.shape[-1] != expected:
                raise ValueError(f"inputs_embeds_BxLxD must have shape [batch, length, {expected}], "
                                 f"got {inputs_embeds_BxLxD.shape}")
            hidden_BxLxD = inputs_embeds_BxLxD.astype(self.dtype)
        B, L, _ = hidden_BxLxD.shape

        if attention_mask_BxL is None:
            mask_BxL = jnp.ones((B, L), jnp.bool_)
        else:
            if attention_mask_BxL.shape != (B, L):
                raise ValueError(f"attention_mask_BxL has shape {attention_mask_BxL.shape}, "
                                 f"expected {(B, L)} to match the inputs")
            mask_BxL = attention_mask_BxL.astype(jnp.bool_)

        if segment_ids_BxL is not None:
            if cache is not None:
                raise ValueError("Llama: segment_ids_BxL cannot be combined with a KV cache; "
                                 "decode packed sequences one row per sequence")
            if segment_ids_BxL.shape != (B, L):
                raise ValueError(f"segment_ids_BxL has shape {segment_ids_BxL.shape}, expected "
                                 f"{(B, L)} to match the inputs")

        if cache is None:
            key_mask_BxS = mask_BxL
            query_slots_L = jnp.arange(L)
            layer_cache = None
            allowed_cached_BxLxS = None
        else:
            cache_index = cache["index"]
            S = cache["mask"].shape[1]
            # Cached slots before `index` that contain real tokens are visible to every new
            # query. None means the cache is empty, so the layers skip the cached slots.
            allowed_cached_BxLxS = None if cache_is_empty else jnp.broadcast_to(
                (cache["mask"] & (jnp.arange(S) < cache_index)[None, :])[:, None, :], (B, L, S))
            # NOTE: dynamic_update_slice clamps its start index, so writing past max_len
            # silently overwrites the last slots. Size the cache for prompt + new tokens.
            key_mask_BxS = jax.lax.dynamic_update_slice(cache["mask"], mask_BxL, (0, cache_index))
            query_slots_L = cache_index + jnp.arange(L)
            layer_cache = (cache["k"], cache["v"])

        same_segment_BxLxL = None
        if segment_ids_BxL is not None:
            same_segment_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
        if positions_BxL is None and segment_ids_BxL is not None:
            positions_BxL = segment_positions(segment_ids_BxL, mask_BxL)
        if positions_BxL is None:
            # Position = number of real tokens before this one in the row.
            counts_BxS = jnp.cumsum(key_mask_BxS.astype(jnp.int32), axis=1) - 1
            positions_BxL = jnp.maximum(jnp.take(counts_BxS, query_slots_L, axis=1), 0)
        cos_BxLxE, sin_BxLxE = rope_cos_sin(positions_BxL, self.config.head_dim,
                                            self.config.rope_theta, self.config.rope_scaling)

        causal_LxL = jnp.tril(jnp.ones((L, L), jnp.bool_))
        window = self.config.sliding_window
        if window is not None:
            # Slot distance equals token distance among real tokens, because padding is only at
            # the start (left) or the end (right) of a row.
            offsets_LxL = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]
            causal_LxL = causal_LxL & (offsets_LxL < window)
            if allowed_cached_BxLxS is not None:
                cached_offsets_LxS = query_slots_L[:, None] - jnp.arange(S)[None, :]
                allowed_cached_BxLxS = allowed_cached_BxLxS & (cached_offsets_LxS < window)[None]
        allowed_new_BxLxL = causal_LxL[None, :, :] & mask_BxL[:, None, :]
        if same_segment_BxLxL is not None:
            allowed_new_BxLxL = allowed_new_BxLxL & same_segment_BxLxL

        hidden_BxLxD, new_kv = self.layer_stack(hidden_BxLxD, layer_cache, allowed_new_BxLxL,
                                                allowed_cached_BxLxS, cos_BxLxE, sin_BxLxE)
        hidden_BxLxD = self.final_norm(hidden_BxLxD)

        logits_BxLxV = self.project(hidden_BxLxD)

        new_cache = None
        if cache is not None:
            new_k_NxBxLxKxE, new_v_NxBxLxKxE = new_kv
            start = (0, 0, cache_index, 0, 0)
            new_cache = {
                "k": jax.lax.dynamic_update_slice(cache["k"], new_k_NxBxLxKxE, start),
                "v": jax.lax.dynamic_update_slice(cache["v"], new_v_NxBxLxKxE, start),
                "mask": key_mask_BxS,
                "index": cache_index + L,
            }
        return LlamaOutput(logits_BxLxV, hidden_BxLxD, new_cache)
