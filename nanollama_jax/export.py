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

The tokenizer is exported as a `tokenizers` BPE model built from the sentencepiece model's
pieces (tokenizer.json, loaded by transformers as PreTrainedTokenizerFast), which reproduces
our sentencepiece options exactly: no dummy prefix, spaces as "▁" starting a new piece, digits
split, byte fallback. tokenizer.model is copied beside it for sentencepiece users. A tokenizer
with the chat tokens exports them as special tokens, with the chat format as the Jinja chat
template (data/chat.py), so `apply_chat_template` gives the ids our formatter gives.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np

from nanollama_jax import config as config_lib
from nanollama_jax import errors
from nanollama_jax.data import chat
from nanollama_jax.data.tokenizer import CHAT_TOKENS, Tokenizer

# The files of a Hugging Face model directory (its own names, not a workdir's).
SAFETENSORS, HF_CONFIG, HF_SPIECE = "model.safetensors", "config.json", "tokenizer.model"
_NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_DTYPES = tuple(_NUMPY_DTYPES)


class ExportError(errors.CheckpointError):
  """The model or directory cannot be converted; the message says why."""


def hf_config(model_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None,
              dtype: str) -> dict[str, Any]:
  """The config.json of the Hugging Face Llama equivalent of `model_cfg`."""
  if model_cfg.qk_norm:
    raise ExportError("model.qk_norm=True has no Hugging Face Llama equivalent (LlamaForCausalLM "
                      "has no per-head q/k norm); export a model trained without QK-norm")
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
      raise ExportError(f"tensor {name!r} is missing")
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


def _bpe_merges(pieces: list[str], normal: set[int]) -> list[tuple[str, str]]:
  """The merges that rebuild each BPE piece, in the order sentencepiece applies them.

  Sentencepiece's BPE scores pieces by creation order (the piece id); a piece of length n is
  the merge of any split into two pieces that exist. Ties between splits of the same piece are
  broken by the ids of the parts, like Hugging Face's converter does.
  """
  index = {p: i for i, p in enumerate(pieces) if i in normal}
  merges = []
  for i, piece in enumerate(pieces):
    if i not in normal or len(piece) < 2:
      continue
    splits = [(index[piece[:k]], index[piece[k:]]) for k in range(1, len(piece))
              if piece[:k] in index and piece[k:] in index]
    for a, b in sorted(splits):
      merges.append((i, a, b))
  merges.sort()
  return [(pieces[a], pieces[b]) for _, a, b in merges]


def write_tokenizer(tokenizer: Tokenizer, out_dir: str, max_length: int) -> None:
  """Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  from tokenizers import AddedToken  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
  from transformers import PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(tokenizer.proto)
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  expected = {"model_type": (spec.model_type, spec.BPE), "byte_fallback": (spec.byte_fallback, True),
              "add_dummy_prefix": (norm.add_dummy_prefix, False),
              "normalization": (norm.name, "identity"), "split_digits": (spec.split_digits, True)}
  wrong = [f"{k}={got}" for k, (got, want) in expected.items() if got != want]
  if wrong:
    raise ExportError(f"the tokenizer was not trained with this project's options ({', '.join(wrong)}"
                      "): only those are converted exactly")
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(tokenizer.proto)
  pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  normal = {i for i in range(len(pieces))
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
  vocab = {p: i for i, p in enumerate(pieces)}
  hf = HFTokenizer(models.BPE(vocab=vocab, merges=_bpe_merges(pieces, normal), byte_fallback=True,
                              unk_token=pieces[tokenizer.unk_id], fuse_unk=True))
  hf.normalizer = normalizers.Replace(" ", "▁")
  hf.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split("▁", behavior="merged_with_next"),  # each space starts a new piece
    pre_tokenizers.Digits(individual_digits=True),
  ])
  hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                  decoders.Fuse()])
  bos, eos = pieces[tokenizer.bos_id], pieces[tokenizer.eos_id]
  # Like Llama's tokenizers, encoding with special tokens puts BOS first (the model was trained
  # on [BOS] + document + [EOS]).
  hf.post_processor = processors.TemplateProcessing(
    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
  chat_format = {}
  if tokenizer.has_chat_tokens:
    # Special: matched whole in text (as the chat template renders them), never split or
    # normalised, and skipped by decode(skip_special_tokens=True).
    chat_format = {"chat_template": chat.TEMPLATE, "additional_special_tokens": [
      AddedToken(piece, special=True, normalized=False) for piece in CHAT_TOKENS]}
  fast = PreTrainedTokenizerFast(
    tokenizer_object=hf, bos_token=bos, eos_token=eos, unk_token=pieces[tokenizer.unk_id],
    pad_token=pieces[tokenizer.pad_id], model_max_length=max_length,
    clean_up_tokenization_spaces=False, **chat_format)
  fast.save_pretrained(out_dir, save_jinja_files=False)  # the template in tokenizer_config.json
  # The bytes the tokenizer was loaded from: its file may be in a bucket (a gs:// workdir).
  with open(os.path.join(out_dir, HF_SPIECE), "wb") as f:
    f.write(tokenizer.proto)


# --- Directories ---------------------------------------------------------------------------------


def _ordinary_permissions(path: str) -> None:
  """Gives `path` the permissions a new file gets under the process's umask (0644 usually)."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)


def save_hf(out_dir: str, params: dict, model_cfg: ml_collections.ConfigDict,
            tokenizer: Tokenizer | None = None, dtype: str = "float32") -> None:
  """Writes a Hugging Face Llama directory: config.json, model.safetensors (+ tokenizer)."""
  errors.require(errors.MODULES["hf"], "hf", "export to Hugging Face")
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  if dtype not in _DTYPES:
    raise ExportError(f"dtype={dtype!r}: choose one of {', '.join(_DTYPES)}")
  hf_cfg = hf_config(model_cfg, tokenizer, dtype)
  tensors = to_hf_tensors(params, model_cfg)
  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, SAFETENSORS)
  # ml_dtypes rounds float32 to bfloat16 to nearest even, as torch does: the same bytes.
  # "format": "pt" tells transformers the tensors are in torch's layout.
  save_file({k: v.astype(_NUMPY_DTYPES[dtype]) for k, v in tensors.items()}, weights,
            metadata={"format": "pt"})
  _ordinary_permissions(weights)  # safetensors writes through a private (0600) temporary file
  with open(os.path.join(out_dir, HF_CONFIG), "w", encoding="utf-8") as f:
    json.dump(hf_cfg, f, indent=2)
  with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": hf_cfg["eos_token_id"],
               "pad_token_id": hf_cfg["pad_token_id"]}, f, indent=2)
  if tokenizer is not None:
    write_tokenizer(tokenizer, out_dir, model_cfg.max_seq_len)


def model_config_from_hf(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """Our model config for a Hugging Face Llama config.json; refuses what we cannot represent."""
  arch = hf.get("architectures") or ["LlamaForCausalLM"]
  if hf.get("model_type", "llama") != "llama" or arch[0] != "LlamaForCausalLM":
    raise ExportError(f"not a Llama model: model_type={hf.get('model_type')!r}, "
                      f"architectures={arch}")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ExportError(f"{key}=True: our Llama has no biases")
  if hf.get("hidden_act", "silu") != "silu":
    raise ExportError(f"hidden_act={hf['hidden_act']!r}: only silu (SwiGLU) is supported")
  model_cfg = config_lib.get_default_config().model
  model_cfg.vocab_size = hf["vocab_size"]
  model_cfg.dim = hf["hidden_size"]
  model_cfg.n_layers = hf["num_hidden_layers"]
  model_cfg.n_heads = hf["num_attention_heads"]
  model_cfg.n_kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
  if hf.get("head_dim") not in (None, config_lib.head_dim(model_cfg)):
    raise ExportError(f"head_dim={hf['head_dim']} differs from hidden_size / heads")
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
      raise ExportError(f"rope scaling {kind!r}: only llama3 (Llama 3.1) scaling is supported")
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
    raise ExportError(f"{directory} has no config.json: not a Hugging Face model directory")
  with open(path, encoding="utf-8") as f:
    model_cfg = model_config_from_hf(json.load(f))
  index = os.path.join(directory, SAFETENSORS + ".index.json")
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(directory, SAFETENSORS)):
    files = [SAFETENSORS]
  else:
    raise ExportError(f"{directory} has no {SAFETENSORS} (nor an index of shards); "
                      "pickled .bin weights are not read")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(load_file(os.path.join(directory, name)))
  return model_cfg, from_hf_tensors(tensors, model_cfg, dtype)
