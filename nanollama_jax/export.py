"""Hugging Face Llama format, both ways: our parameters <-> `LlamaForCausalLM` + safetensors.

Our layout and Hugging Face's agree on RoPE (both rotate feature i with feature i + head_dim/2,
the "half-split" layout), so weights only change shape and orientation:

  ours                          Hugging Face (torch Linear weights are [out, in])
  embed_VxD                     model.embed_tokens.weight                 [V, D]
  layers/attn/wq_DxHxE[l]       model.layers.l.self_attn.q_proj.weight    [H*E, D]
  layers/attn/wk_DxKxE[l]       ...k_proj.weight [K*E, D], v_proj likewise
  layers/attn/wo_HxExD[l]       ...o_proj.weight                          [D, H*E]
  layers/attn_norm/scale[l]     ...input_layernorm.weight                 [D]
  layers/mlp/w_gate_DxF[l]      ...mlp.gate_proj.weight [F, D], up_proj likewise
  layers/mlp/w_down_FxD[l]      ...mlp.down_proj.weight                   [D, F]
  layers/mlp_norm/scale[l]      ...post_attention_layernorm.weight        [D]
  final_norm/scale              model.norm.weight                         [D]
  lm_head_DxV                   lm_head.weight                            [V, D] (absent if tied)

Models with QK-norm have no Hugging Face Llama equivalent and are refused.

The tokenizer goes with the weights (`write_tokenizer`): a tokenizer.json one as its own files,
a sentencepiece one converted to a tokenizer.json with the same ids. config.json's
`pad_token_id` is the tokenizer's pad id, which is always a valid id (its EOS when it has no
pad token).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np

from nanollama_jax import config as config_lib
from nanollama_jax import errors
from nanollama_jax.data import chat, spm_tokenizer, tokenizer_source
from nanollama_jax.data.spm_tokenizer import CHAT_TOKENS, SentencePieceTokenizer
from nanollama_jax.data.tokenizer import Tokenizer

# The files of a Hugging Face model directory (its own names, not a workdir's).
SAFETENSORS, HF_CONFIG = "model.safetensors", "config.json"
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_DTYPES = tuple(_NUMPY_DTYPES)


def hf_config(model_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None,
              dtype: str) -> dict[str, Any]:
  """The config.json of the Hugging Face Llama equivalent of `model_cfg`."""
  if model_cfg.qk_norm:
    raise errors.ExportError(
      "model.qk_norm=True has no Hugging Face Llama equivalent (LlamaForCausalLM has no "
      "per-head q/k norm); export a model trained without QK-norm")
  rope = {"rope_type": "default", "rope_theta": float(model_cfg.rope_theta)}
  legacy_scaling = None
  if model_cfg.rope_scaling is not None:
    rs = dict(model_cfg.rope_scaling)
    legacy_scaling = {"rope_type": "llama3", "factor": float(rs["factor"]),
                      "low_freq_factor": float(rs["low_freq_factor"]),
                      "high_freq_factor": float(rs["high_freq_factor"]),
                      "original_max_position_embeddings": int(
                        rs["original_max_position_embeddings"])}
    rope = {**legacy_scaling, "rope_theta": float(model_cfg.rope_theta)}
  ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
  if tokenizer is not None:
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
           "pad_token_id": tokenizer.pad_id}
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": model_cfg.vocab_size,
    "hidden_size": model_cfg.dim,
    "intermediate_size": model_cfg.ffn_dim,
    "num_hidden_layers": model_cfg.n_layers,
    "num_attention_heads": model_cfg.n_heads,
    "num_key_value_heads": model_cfg.n_kv_heads,
    "head_dim": config_lib.head_dim(model_cfg),
    "hidden_act": "silu",
    "max_position_embeddings": model_cfg.max_seq_len,
    "rms_norm_eps": float(model_cfg.norm_eps),
    "tie_word_embeddings": bool(model_cfg.tie_embeddings),
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": float(model_cfg.init_std),
    # transformers >= 5 reads rope_parameters; earlier versions rope_theta and rope_scaling.
    "rope_parameters": rope,
    "rope_theta": float(model_cfg.rope_theta),
    "rope_scaling": legacy_scaling,
    "torch_dtype": dtype,
    "use_cache": True,
    **ids,
  }


def to_hf_tensors(params: dict, model_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Our parameter tree as Hugging Face Llama state-dict arrays (float32 numpy)."""
  D, H, K = model_cfg.dim, model_cfg.n_heads, model_cfg.n_kv_heads
  E = config_lib.head_dim(model_cfg)
  out = {"model.embed_tokens.weight": np.asarray(params["embed_VxD"], np.float32),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"], np.float32)}
  layers = params["layers"]
  for i in range(model_cfg.n_layers):
    at = {k: np.asarray(v[i], np.float32) for k, v in layers["attn"].items()}
    mlp = {k: np.asarray(v[i], np.float32) for k, v in layers["mlp"].items()}
    pre = f"model.layers.{i}."
    out[pre + "self_attn.q_proj.weight"] = at["wq_DxHxE"].reshape(D, H * E).T
    out[pre + "self_attn.k_proj.weight"] = at["wk_DxKxE"].reshape(D, K * E).T
    out[pre + "self_attn.v_proj.weight"] = at["wv_DxKxE"].reshape(D, K * E).T
    out[pre + "self_attn.o_proj.weight"] = at["wo_HxExD"].reshape(H * E, D).T
    out[pre + "mlp.gate_proj.weight"] = mlp["w_gate_DxF"].T
    out[pre + "mlp.up_proj.weight"] = mlp["w_up_DxF"].T
    out[pre + "mlp.down_proj.weight"] = mlp["w_down_FxD"].T
    out[pre + "input_layernorm.weight"] = np.asarray(layers["attn_norm"]["scale"][i], np.float32)
    out[pre + "post_attention_layernorm.weight"] = np.asarray(
      layers["mlp_norm"]["scale"][i], np.float32)
  if not model_cfg.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head_DxV"], np.float32).T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_tensors(tensors: dict[str, np.ndarray], model_cfg: ml_collections.ConfigDict,
                    dtype: Any = np.float32) -> dict:
  """Hugging Face Llama state-dict arrays as our parameter tree (the inverse of to_hf_tensors)."""
  D, H, K, L = model_cfg.dim, model_cfg.n_heads, model_cfg.n_kv_heads, model_cfg.n_layers
  E = config_lib.head_dim(model_cfg)

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise errors.ExportError(f"tensor {name!r} is missing")
    return np.asarray(tensors[name], np.float32)

  def stack(fn) -> np.ndarray:
    return np.stack([fn(f"model.layers.{i}.") for i in range(L)]).astype(dtype)

  params = {
    "embed_VxD": get("model.embed_tokens.weight").astype(dtype),
    "final_norm": {"scale": get("model.norm.weight").astype(dtype)},
    "layers": {
      "attn": {
        "wq_DxHxE": stack(lambda p: get(p + "self_attn.q_proj.weight").T.reshape(D, H, E)),
        "wk_DxKxE": stack(lambda p: get(p + "self_attn.k_proj.weight").T.reshape(D, K, E)),
        "wv_DxKxE": stack(lambda p: get(p + "self_attn.v_proj.weight").T.reshape(D, K, E)),
        "wo_HxExD": stack(lambda p: get(p + "self_attn.o_proj.weight").T.reshape(H, E, D)),
      },
      "attn_norm": {"scale": stack(lambda p: get(p + "input_layernorm.weight"))},
      "mlp": {
        "w_gate_DxF": stack(lambda p: get(p + "mlp.gate_proj.weight").T),
        "w_up_DxF": stack(lambda p: get(p + "mlp.up_proj.weight").T),
        "w_down_FxD": stack(lambda p: get(p + "mlp.down_proj.weight").T),
      },
      "mlp_norm": {"scale": stack(lambda p: get(p + "post_attention_layernorm.weight"))},
    },
  }
  if not model_cfg.tie_embeddings:
    params["lm_head_DxV"] = get("lm_head.weight").T.astype(dtype)
  return params


# --- Tokenizer -----------------------------------------------------------------------------------


def check_tokenizer(tokenizer: Tokenizer) -> None:
  """Raises ExportError, before anything is written, for a tokenizer the export cannot carry."""
  if isinstance(tokenizer, SentencePieceTokenizer):
    try:
      spm_tokenizer.check_convertible(tokenizer)
    except errors.DataError as e:
      raise errors.ExportError(str(e)) from None


def write_tokenizer(tokenizer: Tokenizer, out_dir: str, max_length: int) -> None:
  """Writes the tokenizer the way transformers' AutoTokenizer reads it.

  A tokenizer.json tokenizer is written as its own files, byte for byte. A sentencepiece model
  is converted to a tokenizer.json with the same ids (spm_tokenizer.convert), with
  tokenizer_config.json and special_tokens_map.json, and copied beside it as tokenizer.model for
  sentencepiece users; one trained here carries the chat markers as special tokens and the chat
  format as its chat template, so `apply_chat_template` gives the ids our formatter gives.
  """
  if not isinstance(tokenizer, SentencePieceTokenizer):
    tokenizer_source.save(tokenizer, out_dir)
    return
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

  check_tokenizer(tokenizer)
  chat_format = {}
  if tokenizer.has_chat_tokens:
    chat_format = {"chat_template": chat.TEMPLATE, "additional_special_tokens": list(CHAT_TOKENS)}
  own_pad = {"pad_token": tokenizer.piece(tokenizer.pad_id)} if tokenizer.has_pad else {}
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tokenizer.to_hf(), bos_token=tokenizer.piece(tokenizer.bos_id),
    eos_token=tokenizer.piece(tokenizer.eos_id), unk_token=tokenizer.piece(tokenizer.unk_id),
    model_max_length=max_length, clean_up_tokenization_spaces=False, **own_pad, **chat_format)
  fast.save_pretrained(out_dir, save_jinja_files=False)  # the template in tokenizer_config.json
  tokenizer_source.save(tokenizer, out_dir)  # tokenizer.model, its bytes as loaded


# --- Directories ---------------------------------------------------------------------------------


def _ordinary_permissions(path: str) -> None:
  """Gives `path` the permissions a new file gets under the process's umask (0644 usually)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def _check_out(out_dir: str) -> None:
  """Refuses an --out that is a file, or a directory that holds something else than a model."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise errors.ExportError(f"{out_dir} is a file: name the directory to write")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(
      os.path.join(out_dir, HF_CONFIG)):
    raise errors.ExportError(f"{out_dir} is a directory that holds other files than a model's: "
                             "name a new directory (an earlier export there is replaced)")


def save_hf(out_dir: str, params: dict, model_cfg: ml_collections.ConfigDict,
            tokenizer: Tokenizer | None = None, dtype: str = "float32") -> None:
  """Writes a Hugging Face Llama directory: config.json, model.safetensors (+ tokenizer).

  Everything is written into a temporary directory beside `out_dir`, which then replaces it:
  an export that fails leaves nothing at `out_dir` (and an earlier export there as it was).
  """
  errors.require(errors.MODULES["hf"], "hf", "export to Hugging Face")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  if dtype not in _DTYPES:
    raise errors.ExportError(f"dtype={dtype!r}: choose one of {', '.join(_DTYPES)}")
  out_dir = out_dir.rstrip("/") or "/"
  _check_out(out_dir)
  hf_cfg = hf_config(model_cfg, tokenizer, dtype)
  if tokenizer is not None:
    check_tokenizer(tokenizer)
  tensors = to_hf_tensors(params, model_cfg)
  stage = f"{out_dir}.tmp-{os.getpid()}"
  shutil.rmtree(stage, ignore_errors=True)
  os.makedirs(stage)
  try:
    weights = os.path.join(stage, SAFETENSORS)
    # ml_dtypes rounds float32 to bfloat16 to nearest even, as torch does: the same bytes.
    # "format": "pt" tells transformers the tensors are in torch's layout.
    save_file({k: v.astype(_NUMPY_DTYPES[dtype]) for k, v in tensors.items()}, weights,
              metadata={"format": "pt"})
    _ordinary_permissions(weights)  # safetensors writes through a private (0600) temporary file
    with open(os.path.join(stage, HF_CONFIG), "w", encoding="utf-8") as f:
      json.dump(hf_cfg, f, indent=2)
    with open(os.path.join(stage, "generation_config.json"), "w", encoding="utf-8") as f:
      json.dump({"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": hf_cfg["eos_token_id"],
                 "pad_token_id": hf_cfg["pad_token_id"]}, f, indent=2)
    if tokenizer is not None:
      write_tokenizer(tokenizer, stage, model_cfg.max_seq_len)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(stage, out_dir)


def model_config_from_hf(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """Our model config for a Hugging Face Llama config.json; refuses what we cannot represent."""
  arch = hf.get("architectures") or ["LlamaForCausalLM"]
  if hf.get("model_type", "llama") != "llama" or arch[0] != "LlamaForCausalLM":
    raise errors.ExportError(f"not a Llama model: model_type={hf.get('model_type')!r}, "
                             f"architectures={arch}")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise errors.ExportError(f"{key}=True: our Llama has no biases")
  if hf.get("hidden_act", "silu") != "silu":
    raise errors.ExportError(f"hidden_act={hf['hidden_act']!r}: only silu (SwiGLU) is supported")
  model_cfg = config_lib.get_default_config().model
  model_cfg.vocab_size = hf["vocab_size"]
  model_cfg.dim = hf["hidden_size"]
  model_cfg.n_layers = hf["num_hidden_layers"]
  model_cfg.n_heads = hf["num_attention_heads"]
  model_cfg.n_kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
  if hf.get("head_dim") not in (None, config_lib.head_dim(model_cfg)):
    raise errors.ExportError(f"head_dim={hf['head_dim']} differs from hidden_size / heads")
  model_cfg.ffn_dim = hf["intermediate_size"]
  model_cfg.norm_eps = hf.get("rms_norm_eps", 1e-6)
  model_cfg.max_seq_len = hf.get("max_position_embeddings", 2048)
  model_cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  rope = dict(hf.get("rope_parameters") or {})
  scaling = rope if rope.get("rope_type") not in (None, "default") else hf.get("rope_scaling")
  model_cfg.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
      raise errors.ExportError(
        f"rope scaling {kind!r}: only llama3 (Llama 3.1) scaling is supported")
    model_cfg.rope_scaling = {k: scaling[k] for k in config_lib.ROPE_SCALING_KEYS}
  return model_cfg


def load_hf(directory: str, dtype: Any = np.float32) -> tuple[ml_collections.ConfigDict, dict]:
  """Reads a Hugging Face Llama directory (safetensors, one file or an index of shards).

  Returns our model config and parameter tree (numpy arrays); pretrained Llama-architecture
  weights can then be evaluated, sampled or trained on. bfloat16 tensors come as ml_dtypes'
  bfloat16 (importing ml_dtypes gives numpy that name) and are widened exactly.
  """
  errors.require(errors.MODULES["hf"], "hf", "reading a Hugging Face directory")
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  path = os.path.join(directory, HF_CONFIG)
  if not os.path.isfile(path):
    raise errors.ExportError(f"{directory} has no config.json: not a Hugging Face model directory")
  with open(path, encoding="utf-8") as f:
    model_cfg = model_config_from_hf(json.load(f))
  index = os.path.join(directory, SAFETENSORS + ".index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(directory, SAFETENSORS)):
    files = [SAFETENSORS]
  else:
    raise errors.ExportError(f"{directory} has no {SAFETENSORS} (nor an index of shards); "
                             "pickled .bin weights are not read")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(load_file(os.path.join(directory, name)))
  return model_cfg, from_hf_tensors(tensors, model_cfg, dtype)
