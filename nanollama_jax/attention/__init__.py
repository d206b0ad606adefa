"""Attention behind one function; `impl` picks the implementation (model.attention), `target`
the platform it is built for.

  xla     plain jax.numpy (attention/xla.py): any platform, the reference
  pallas  our flash-attention kernel for CUDA GPUs (attention/pallas.py)
  splash  JAX's splash-attention kernel for TPUs (attention/splash.py)
  cudnn   jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPUs
  auto    pallas on a CUDA GPU, splash on a TPU, xla elsewhere

The target defaults to the running devices. An explicit one (`Platform("tpu", "v5e")`) builds that
platform's program on any host, for ahead-of-time lowering: a CPU host can lower the exact GPU
or TPU train step. A kernel is refused for a target it cannot run on, with one exception for
tests: with NANOLLAMA_PALLAS_INTERPRET=1, pallas and splash run in Pallas interpret mode on a
CPU.

Kernels are custom calls that XLA's partitioner cannot split, so under a mesh each device runs
them on its own block of the batch and heads (sharding.per_shard).

Shapes: B batch, T query length, S key length, H query heads, K key/value heads (K divides H,
G = H // K query heads share one K/V head), E head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax

from nanollama_jax import errors, sharding, targets
from nanollama_jax.attention.xla import xla_attention
from nanollama_jax.config import ATTENTION_IMPLS

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The platform each kernel is built for (xla: any).
_KERNEL_PLATFORM = {"pallas": "cuda", "cudnn": "cuda", "splash": "tpu"}
_KERNEL_NAME = {"pallas": "a CUDA GPU kernel", "cudnn": "an NVIDIA GPU kernel",
                "splash": "a TPU kernel"}


@dataclasses.dataclass(frozen=True)
class Platform:
  """The platform a program is built for: 'cpu', 'rocm', 'cuda' with a GPU generation ('sm_90'),
  or 'tpu' with a TPU generation ('v4', 'v5e', 'v5p', 'v6e', ...)."""

  platform: str
  generation: str | None = None

  def __post_init__(self):
    if self.platform not in PLATFORMS:
      raise errors.ConfigError(
        f"target platform {self.platform!r}: allowed: {', '.join(PLATFORMS)}")
    if self.platform == "cuda" and not re.fullmatch(r"sm_\d+", str(self.generation)):
      raise errors.ConfigError(
        f"target generation {self.generation!r} for cuda: give the GPU's compute "
        "capability as 'sm_XY', e.g. 'sm_80' (A100), 'sm_86' (RTX 3090), "
        "'sm_90' (H100)")
    if self.platform == "tpu" and not self.generation:
      raise errors.ConfigError("target generation None for tpu: name one, e.g. "
                               + ", ".join(repr(g) for g in targets.TPUS))
    if self.platform in ("cpu", "rocm") and self.generation is not None:
      raise errors.ConfigError(
        f"target generation {self.generation!r} for {self.platform}: must be None")

  @classmethod
  def of(cls, device: jax.Device) -> Platform:
    """The target that `device` is."""
    if device.platform == "tpu":
      return cls("tpu", targets.tpu_generation(device.device_kind)
                 or device.device_kind.lower().removeprefix("tpu "))
    if device.platform == "gpu":
      if "rocm" in device.client.platform_version:
        return cls("rocm")
      return cls("cuda", targets.gpu_generation(getattr(device, "compute_capability", None)))
    return cls(device.platform)

  @classmethod
  def running(cls) -> Platform:
    """The target of this process's devices."""
    return cls.of(jax.devices()[0])


def _interpret_requested() -> bool:
  from nanollama_jax.attention import pallas  # pylint: disable=import-outside-toplevel
  return pallas.interpret_requested()


def resolve(impl: str, target: Platform) -> str:
  """The implementation `impl` stands for on `target` ('auto' resolved); raises if `target`
  cannot run it."""
  if impl not in ATTENTION_IMPLS:
    raise errors.ConfigError(f"model.attention={impl!r}: allowed: {', '.join(ATTENTION_IMPLS)}")
  if impl == "auto":
    return {"cuda": "pallas", "tpu": "splash"}.get(target.platform, "xla")
  needs = _KERNEL_PLATFORM.get(impl, target.platform)
  interpreted = target.platform == "cpu" and impl != "cudnn" and _interpret_requested()
  if needs != target.platform and not interpreted:
    raise errors.ConfigError(f"model.attention={impl!r} is {_KERNEL_NAME[impl]} and the target is "
                             f"{target.platform}: use model.attention='xla' (or 'auto', which "
                             f"picks {resolve('auto', target)!r} there)")
  return impl


def _cudnn_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, causal):
  mask = None
  if segment_ids_BxT is not None:
    mask = (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])
  out = jax.nn.dot_product_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mask=mask,
                                     is_causal=causal, implementation="cudnn")
  return out.astype(q_BxTxHxE.dtype)


def _kernel(impl: str, target: Platform, causal: bool):
  """The kernel function (q, k, v, segment ids) -> out of `impl` built for `target`."""
  interpret = target.platform == "cpu"  # resolve() allowed it: Pallas interpret mode
  generation = None if interpret else target.generation
  if impl == "pallas":
    from nanollama_jax.attention import pallas  # pylint: disable=import-outside-toplevel
    return functools.partial(pallas.pallas_attention, causal=causal, interpret=interpret,
                             generation=generation)
  if impl == "splash":
    from nanollama_jax.attention import splash  # pylint: disable=import-outside-toplevel
    return functools.partial(splash.splash_attention, causal=causal, interpret=interpret,
                             generation=generation)
  return functools.partial(_cudnn_attention, causal=causal)


def attention(
  q_BxTxHxE: jax.Array,
  k_BxSxKxE: jax.Array,
  v_BxSxKxE: jax.Array,
  segment_ids_BxT: jax.Array | None = None,
  causal: bool = True,
  impl: str = "xla",
  target: Platform | None = None,
) -> jax.Array:
  """Scaled dot-product attention with GQA, causal masking and packed-document isolation."""
  target = target or Platform.running()
  impl = resolve(impl, target)
  if impl == "xla":
    return xla_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT, causal)
  kernel = _kernel(impl, target, causal)
  # K/V heads are split with the query heads (both named `heads`): query head h of a device's
  # block must find K/V head h // G in the same block.
  heads = ("batch", "length", "heads", "head_dim")
  if segment_ids_BxT is None:
    return sharding.per_shard(lambda q, k, v: kernel(q, k, v, None), (heads,) * 3, heads)(
      q_BxTxHxE, k_BxSxKxE, v_BxSxKxE)
  return sharding.per_shard(kernel, (heads,) * 3 + (("batch", "length"),), heads)(
    q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT)
