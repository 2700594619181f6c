"""`TransformerConfig`: the shape and the options of a decoder-only transformer.

One config covers the Llama, Qwen2 and Qwen3 families (RMSNorm, rotary position
embeddings, SwiGLU MLP, grouped-query attention; optional q/k/v biases, q/k norms and
tied embeddings). `TransformerConfig.from_hf(config_dict)` reads a checkpoint's
`config.json` (field names of transformers 4.x and 5.x: `rope_parameters`, or the older
`rope_theta` with `rope_scaling`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .._errors import ArgumentError

__all__ = ["TransformerConfig", "SUPPORTED_ARCHITECTURES"]

# model_type -> the architecture name config.json lists
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of a decoder-only transformer (hashable, static under `jit`).

    Fields:
      vocab_size:          V, rows of the embedding and columns of the output layer.
      hidden_size:         d, the residual stream width.
      intermediate_size:   the SwiGLU MLP's hidden width.
      num_layers:          number of transformer blocks.
      num_heads:           query heads H.
      num_kv_heads:        key/value heads (grouped-query attention; divides H).
      head_dim:            width of one head (Qwen3 sets it apart from d / H).
      rope_theta:          base of the rotary embedding's frequencies.
      rope_scaling:        None, or a tuple of (name, value) pairs: ("rope_type",
                           "linear" | "llama3") and that type's parameters.
      rms_norm_eps:        epsilon of every RMSNorm.
      qkv_bias:            biases on the q, k and v projections (Qwen2; Llama and Qwen3
                           with `attention_bias`).
      output_bias:         a bias on the attention output projection (`attention_bias`
                           of Llama and Qwen3).
      mlp_bias:            biases on the MLP projections (Llama's `mlp_bias`).
      qk_norm:             RMSNorm over each head of q and k before the rotation (Qwen3).
      tie_word_embeddings: the output layer is the transposed embedding.
      max_position_embeddings: the longest context the model was trained for.
      model_type:          "llama", "qwen2" or "qwen3" (informative).

    >>> cfg = TransformerConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
    ...                         num_heads=4, num_kv_heads=2)
    >>> cfg.head_dim, cfg.num_groups
    (4, 2)
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    model_type: str = "llama"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ArgumentError(
                f"TransformerConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise ArgumentError(f"TransformerConfig: head_dim must be even for rotary embeddings, got {self.head_dim}.")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def inv_freq(self) -> np.ndarray:
        """[head_dim / 2] float32 rotary frequencies, with the configured scaling."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
        inv = inv.astype(np.float32)
        if self.rope_scaling is None:
            return inv
        params = dict(self.rope_scaling)
        kind = params["rope_type"]
        if kind == "linear":
            return (inv / np.float32(params["factor"])).astype(np.float32)
        # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_context = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(is_medium, blended, scaled).astype(np.float32)

    # -- reading a checkpoint's config.json ---------------------------------------------------
    @classmethod
    def from_hf(cls, config: dict, where: str = "config.json") -> TransformerConfig:
        """The config of a Llama / Qwen2 / Qwen3 checkpoint from its parsed `config.json`.

        Raises `ArgumentError` for another architecture (listing the supported ones) or
        for an option this implementation does not have (sliding-window attention, an
        activation other than SiLU, a RoPE scaling other than linear or llama3).
        """
        model_type = _model_type(config, where)

        def need(name):
            if name not in config:
                raise ArgumentError(f"{where}: the {model_type} config has no '{name}'.")
            return config[name]

        if config.get("hidden_act", "silu") != "silu":
            raise ArgumentError(f"{where}: hidden_act {config['hidden_act']!r} is not supported; only 'silu' (SwiGLU).")
        if config.get("use_sliding_window", False) or any(
                t != "full_attention" for t in config.get("layer_types") or ()):
            raise ArgumentError(f"{where}: sliding-window attention is not supported; only full attention.")
        theta, scaling = _rope(config, where)
        num_heads = need("num_attention_heads")
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or need("hidden_size") // num_heads,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            output_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
            model_type=model_type,
        )


def _model_type(config: dict, where: str) -> str:
    supported = ", ".join(f"{a} (model_type '{t}')" for t, a in SUPPORTED_ARCHITECTURES.items())
    architectures = config.get("architectures") or []
    by_name = {a: t for t, a in SUPPORTED_ARCHITECTURES.items()}
    for name in architectures:
        if name in by_name:
            return by_name[name]
    model_type = config.get("model_type")
    if not architectures and model_type in SUPPORTED_ARCHITECTURES:
        return model_type
    named = architectures[0] if architectures else model_type
    raise ArgumentError(f"{where}: architecture {named!r} is not supported. Supported architectures: {supported}.")


def _rope(config: dict, where: str) -> tuple[float, tuple | None]:
    """`(theta, scaling)` from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    legacy = config.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    if kind not in _ROPE_TYPES:
        raise ArgumentError(f"{where}: RoPE type {kind!r} is not supported; supported: {', '.join(_ROPE_TYPES)}.")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ArgumentError(f"{where}: partial rotary embeddings (partial_rotary_factor) are not supported.")
    if kind == "default":
        return theta, None
    keys = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    missing = [k for k in keys if k not in params]
    if missing:
        raise ArgumentError(f"{where}: RoPE type {kind!r} needs {', '.join(missing)}.")
    return theta, (("rope_type", kind),) + tuple((k, float(params[k])) for k in keys)
