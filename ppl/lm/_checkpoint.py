"""Loading a Llama / Qwen2 / Qwen3 checkpoint and its tokenizer from a local folder.

A checkpoint folder in the Hugging Face layout holds `config.json`, the weights in
`*.safetensors` (one file, or shards), `tokenizer.json`, and optionally
`generation_config.json`. Nothing is downloaded: the folder must be on disk.
`load_checkpoint(folder)` gives a `Transformer`; `load_tokenizer(folder)` a `Tokenizer`;
`load(folder)` both, as a `LanguageModel`, with the end-of-answer token ids the config
names.
"""

from __future__ import annotations

import glob
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .._errors import ArgumentError
from ._config import TransformerConfig
from ._state import PAD, LMState, check_context, init_state
from ._transformer import Transformer

__all__ = ["load_checkpoint", "load_tokenizer", "load", "Tokenizer", "LanguageModel"]

# our name -> (Hugging Face name within layer i, transpose?)
_LAYER_WEIGHTS = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "o": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_bias": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
    "gate_bias": ("mlp.gate_proj.bias", False),
    "up_bias": ("mlp.up_proj.bias", False),
    "down_bias": ("mlp.down_proj.bias", False),
}


def _wanted(config: TransformerConfig) -> list[str]:
    names = ["attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"]
    if config.qkv_bias:
        names += ["q_bias", "k_bias", "v_bias"]
    if config.output_bias:
        names += ["o_bias"]
    if config.mlp_bias:
        names += ["gate_bias", "up_bias", "down_bias"]
    if config.qk_norm:
        names += ["q_norm", "k_norm"]
    return names


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise ArgumentError(f"load_checkpoint: {folder!r} is not a folder; give the local checkpoint folder "
                            "(config.json, *.safetensors, tokenizer.json).")
    if not os.path.exists(path):
        raise ArgumentError(f"load_checkpoint: {folder!r} has no config.json.")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(folder: str, dtype=jnp.float32) -> Transformer:
    """The `Transformer` of the checkpoint in `folder` (config.json + *.safetensors), weights cast to `dtype`.

    Raises `ArgumentError` for an unsupported architecture (naming the supported ones),
    a missing file, or a weight the architecture needs that no file holds (named).
    """
    raw = read_config(folder)
    config = TransformerConfig.from_hf(raw, where=os.path.join(folder, "config.json"))
    tensors = _read_safetensors(folder)
    prefix = "model." if any(name.startswith("model.") for name in tensors) else ""

    def take(name, transpose=False):
        if name not in tensors:
            raise ArgumentError(
                f"load_checkpoint: {folder!r} has no weight {name!r}, which a {config.model_type} model with "
                "this config.json needs.")
        array = tensors[name]
        return array.T if transpose else array

    def as_jax(array):
        return jnp.asarray(np.asarray(array), dtype=dtype)

    layers = {}
    for ours in _wanted(config):
        theirs, transpose = _LAYER_WEIGHTS[ours]
        layers[ours] = as_jax(np.stack([take(f"{prefix}layers.{i}.{theirs}", transpose)
                                        for i in range(config.num_layers)]))
    embed = as_jax(take(f"{prefix}embed_tokens.weight"))
    lm_head = None if config.tie_word_embeddings else as_jax(take("lm_head.weight", transpose=True))
    if embed.shape != (config.vocab_size, config.hidden_size):
        raise ArgumentError(f"load_checkpoint: the embedding has shape {embed.shape}, config.json says "
                            f"({config.vocab_size}, {config.hidden_size}).")
    return Transformer(config, embed, layers, as_jax(take(f"{prefix}norm.weight")), lm_head)


def _read_safetensors(folder: str) -> dict:
    """name -> numpy array over every *.safetensors file in `folder` (bfloat16 via ml_dtypes)."""
    from safetensors.numpy import load_file

    paths = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not paths:
        raise ArgumentError(f"load_checkpoint: {folder!r} has no *.safetensors weight file.")
    tensors = {}
    for path in paths:
        try:
            tensors.update(load_file(path))
        except TypeError:  # numpy has no bfloat16: read such files through their header
            tensors.update(_read_raw(path))
    return tensors


_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
               "I64": np.int64, "I32": np.int32}


def _read_raw(path: str) -> dict:
    """A safetensors file by its layout: 8-byte little-endian header size, JSON header, data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _RAW_DTYPES:
            raise ArgumentError(f"load_checkpoint: {path}: tensor {name!r} has dtype {info['dtype']}, "
                                f"not one of {', '.join(_RAW_DTYPES)}.")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], _RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


# -- tokenizer -------------------------------------------------------------------------------------


class Tokenizer:
    """A `tokenizers.Tokenizer` with numpy int32 in and out.

    `encode(text)` -> int32 [n] (no special tokens added unless asked); `decode(ids)` ->
    str, skipping padding (-1); `token_id(text)` the id of a single token;
    `ids_containing(text)` every token id whose text contains `text` (e.g. all tokens
    holding "\\n\\n", to use as step delimiters); `vocab_size` counts added tokens.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if i != PAD]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, text: str) -> int:
        token = self.tokenizer.token_to_id(text)
        if token is None:
            ids = self.encode(text)
            if len(ids) != 1:
                raise ArgumentError(f"Tokenizer.token_id: {text!r} is not one token (it encodes to {ids.tolist()}).")
            token = int(ids[0])
        return int(token)

    def ids_containing(self, text: str) -> tuple[int, ...]:
        pieces = self.tokenizer.decode_batch([[i] for i in range(self.vocab_size)])
        return tuple(i for i, piece in enumerate(pieces) if text in piece)


def load_tokenizer(folder: str, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer in `folder`/tokenizer.json. With `vocab_size` (the model's), a tokenizer
    whose ids do not fit the model's vocabulary is an `ArgumentError` naming both sizes."""
    from tokenizers import Tokenizer as HFTokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise ArgumentError(f"load_tokenizer: {folder!r} has no tokenizer.json.")
    tokenizer = Tokenizer(HFTokenizer.from_file(path))
    # A checkpoint may pad its vocabulary beyond the tokenizer's (Qwen does); the reverse
    # means token ids with no embedding row.
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ArgumentError(
            f"load_tokenizer: the tokenizer in {folder!r} has {tokenizer.vocab_size} tokens, but the checkpoint's "
            f"vocabulary has {vocab_size} (vocab_size in config.json): they do not belong together.")
    return tokenizer


class LanguageModel(NamedTuple):
    """A checkpoint's model and tokenizer, and its end-of-answer token ids.

    `prompt(text, cache_size)` encodes a prompt and runs it through the model (an
    `LMState`); a prompt that does not fit the context raises `ArgumentError` with both
    numbers. `step(max_step_len, delimiter=..., **sampler)` is `lm_step` with the
    checkpoint's end-of-answer ids and, if given, every token containing `delimiter`
    as a step delimiter.
    """

    model: Transformer
    tokenizer: Tokenizer
    eos_tokens: tuple

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        return self.tokenizer.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def prompt(self, text: str, cache_size: int, add_special_tokens: bool = False) -> LMState:
        ids = self.encode(text, add_special_tokens)
        check_context(len(ids), cache_size, self.model, "LanguageModel.prompt")
        return init_state(self.model, jnp.asarray(ids), cache_size)

    def step(self, max_step_len: int, delimiter: str | None = None, **sampler):
        from ._step import lm_step

        stop = self.tokenizer.ids_containing(delimiter) if delimiter else ()
        stop = tuple(t for t in stop if t < self.model.config.vocab_size)
        return lm_step(self.model, max_step_len, stop_tokens=stop, eos_tokens=self.eos_tokens, **sampler)


def load(folder: str, dtype=jnp.float32) -> LanguageModel:
    """Model, tokenizer and end-of-answer ids of the checkpoint in `folder` (see `load_checkpoint`)."""
    model = load_checkpoint(folder, dtype)
    tokenizer = load_tokenizer(folder, model.config.vocab_size)
    eos = set()
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                value = json.load(f).get("eos_token_id")
            eos.update([value] if isinstance(value, int) else value or [])
    return LanguageModel(model, tokenizer, tuple(sorted(eos)))


jax.tree_util.register_static(Tokenizer)
