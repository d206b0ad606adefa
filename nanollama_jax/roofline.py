"""What a compiled program costs per device, read off its optimized HLO, and the step time a
device's peaks allow (a roofline).

`hlo_costs` walks the text of a compiled XLA program (`compiled.as_text()`, GPUs and TPUs alike)
and counts, per device and run:
  bytes       memory traffic: the operands and outputs of every instruction that runs as one
              kernel (fusions, custom calls, copies, collectives...), once per run of the loops
              around it; a slice reads the slice, an in-place update writes the update, and an
              array a TPU keeps in on-chip memory (layout `S(1)`, VMEM) moves no HBM bytes
  collective  bytes each device sends in all-gathers, reduce-scatters, all-reduces (a ring: 2x),
              all-to-alls and collective permutes, by the size of each one's device group
  flops       2 x M x N x K of every dot, cuBLAS call and convolution (its taps that read real
              input), fused or not, once per run of its loops
Loops matter: libtpu's own `cost_analysis()` counts a while loop's body once, so a model whose
layers are a scan shows the cost of one layer. Trip counts come from XLA's `known_trip_count`
where the GPU compiler writes it, else from the loop's condition (`i < N`, from 0).

The FLOPs are a check, not the prediction (aot.py models those from the model): on one device
they equal the model's matmul FLOPs (within 1% on a v5e, exactly on a GPU), but the collective
matmuls libtpu builds for FSDP (windowed einsums) count more than the model computes, and a
matmul XLA writes as multiply and reduce (a decode step's few rows on a TPU) counts none.
Attention in Pallas or Mosaic kernels is opaque to both counts but its operands and outputs.

`Bound` turns costs into times at a device's peaks; the step takes at least the longest of the
three (perfect overlap), and about their sum if nothing overlaps.
"""

from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}
# An array type: dtype, dimensions, and the layout when one is printed.
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e\w+)\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation)="
                     r"%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
# Instructions that move no data themselves, or whose work is counted where it happens.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
         "call", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
         "all-gather-done", "all-reduce-done", "collective-permute-done", "async-done",
         "copy-done", "send-done", "recv-done", "async-update", "domain", "slice-done",
         "all-to-all-done", "reduce-scatter-done"}
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # the result type as printed: 'bf16[8,128]{1,0}' or a tuple '(f32[], ...)'
  opcode: str
  operands: list[str]
  args: str  # the text between the parentheses (a constant's value)
  attrs: str  # everything after the operand list


@dataclasses.dataclass
class Computation:
  name: str
  entry: bool
  instructions: list[Instruction]

  def shapes(self) -> dict[str, str]:
    return {i.name: i.shape for i in self.instructions}


@dataclasses.dataclass
class Costs:
  """Per device, one run of the program."""
  flops: float = 0.0
  bytes: float = 0.0
  collective_bytes: float = 0.0
  loops: list[int] = dataclasses.field(default_factory=list)  # trip counts found
  uncounted_loops: int = 0  # loops whose trip count could not be read (counted once)


def _arrays(shape: str, any_space: bool = False) -> list[float]:
  """Bytes of each array of a printed type that lives in device memory: one a TPU layout
  places in another memory space (`S(1)`: VMEM, on the chip) moves no HBM bytes (unless
  `any_space`: what a collective sends)."""
  out = []
  for m in _ARRAY.finditer(shape):
    dtype, dims, layout = m.groups()
    space = re.search(r"S\((\d+)\)", layout or "")
    if space and space.group(1) != "0" and not any_space:
      out.append(0.0)
      continue
    out.append(_DTYPE_BYTES.get(dtype, 1) * math.prod(int(d) for d in dims.split(",") if d))
  return out


def array_bytes(shape: str) -> float:
  """Bytes of every array of a printed type in device memory (a tuple's elements summed)."""
  return sum(_arrays(shape))


def _largest(shape: str) -> float:
  """Bytes of the largest array of a printed type."""
  return max(_arrays(shape) or [0.0])


def _dims(shape: str, index: int = 0) -> list[int]:
  """The dimensions of the `index`-th array of a printed type."""
  found = _ARRAY.findall(shape)
  if len(found) <= index:
    return []
  return [int(d) for d in found[index][1].split(",") if d]


def _closing(text: str, start: int) -> int:
  """The index of the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  return len(text) - 1


def _split_instruction(line: str) -> Instruction | None:
  m = _NAME.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith("("):  # a tuple type
    end = _closing(rest, 0)
    shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"([\w\-$.]+)\(", rest)
  if not op:
    return None
  end = _closing(rest, op.end() - 1)
  args = rest[op.end():end]
  return Instruction(m.group(1), shape, op.group(1), re.findall(r"%([\w.\-]+)", args), args,
                     rest[end + 1:])


def parse(text: str) -> list[Computation]:
  """The computations of an HLO module's text, in the order printed (callees first)."""
  computations: list[Computation] = []
  current: Computation | None = None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and "(" in line:
        current = Computation(m.group(2), bool(m.group(1)), [])
      continue
    if line.strip() == "}":
      computations.append(current)
      current = None
      continue
    inst = _split_instruction(line)
    if inst:
      current.instructions.append(inst)
  return computations


def _trip_count(inst: Instruction, by_name: dict[str, Computation]) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%([\w.\-]+)", inst.attrs)
  if not cond:
    return None
  # A scan's condition is `i < N` with i from 0: N is the one integer constant of the condition
  # (or of the fusion that computes it).
  values, seen, todo = set(), set(), [cond.group(1)]
  while todo:
    name = todo.pop()
    if name in seen or name not in by_name:
      continue
    seen.add(name)
    for i in by_name[name].instructions:
      if i.opcode == "constant" and re.match(r"[su]\d+\[\]", i.shape):
        values.add(int(i.args))
      todo += [callee for _, callee in _CALLED.findall(i.attrs)]
  return values.pop() if len(values) == 1 and next(iter(values)) > 0 else None


def _group_size(attrs: str, devices: int) -> int:
  """How many devices one collective spans, from its replica groups."""
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return max(1, len([x for x in m.group(1).split(",") if x]))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)  # iota form: [groups, size]
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs)  # named mesh axes
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes.get(a, 1)) for a in re.findall(r"'(\w+)'", m.group(2))) or 1
  return devices


def _dot_flops(inst: Instruction, shapes: dict[str, str]) -> float:
  if inst.opcode == "dot":
    lhs = _dims(shapes.get(inst.operands[0], "")) if inst.operands else []
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 0
    return 2.0 * math.prod(_dims(inst.shape)) * k
  if inst.opcode == "convolution":
    return _convolution_flops(inst, shapes)
  if inst.opcode == "custom-call" and "contracting_dimensions" in inst.attrs:  # cuBLAS
    lhs = _dims(shapes.get(inst.operands[0], "")) if inst.operands else []
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
    k = math.prod(lhs[int(d.strip('" '))] for d in m.group(1).split(",") if d.strip('" ')) \
      if m and lhs else 0
    return 2.0 * math.prod(_dims(inst.shape)) * k  # the first array: the product
  return 0.0


def _window(attrs: str) -> dict[str, list[str]]:
  m = re.search(r"window=\{([^}]*)\}", attrs)
  return {k: v.split("x") for k, v in re.findall(r"(\w+)=([\w\-]+)", m.group(1))} if m else {}


def _taps(out_size: int, in_size: int, size: int, pad_low: int, stride: int, lhs_dilate: int,
          rhs_dilate: int) -> int:
  """(output position, kernel tap) pairs of one spatial dimension that read a real input
  element, not padding or the holes of a dilated input."""
  last = (in_size - 1) * lhs_dilate
  count = 0
  for t in range(size):
    offset = t * rhs_dilate - pad_low
    for o in range(out_size):
      pos = o * stride + offset
      if 0 <= pos <= last and pos % lhs_dilate == 0:
        count += 1
  return count


def _convolution_flops(inst: Instruction, shapes: dict[str, str]) -> float:
  """2 x (multiply-adds that touch real input), as XLA's cost analysis counts a convolution:
  libtpu writes many contractions as convolutions, some with padded windows."""
  lhs = _dims(shapes.get(inst.operands[0], "")) if inst.operands else []
  out = _dims(inst.shape)
  m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", inst.attrs)
  if not m or not lhs or not out:
    return 0.0
  lhs_labels, _, out_labels = m.groups()
  groups = re.search(r"feature_group_count=(\d+)", inst.attrs)
  features = lhs[lhs_labels.index("f")] / (int(groups.group(1)) if groups else 1)
  total = 2.0 * out[out_labels.index("b")] * out[out_labels.index("f")] * features
  window = _window(inst.attrs)
  spatial = sorted(c for c in lhs_labels if c.isdigit())
  for d, label in enumerate(spatial):
    def field(name, default, d=d):
      values = window.get(name)
      return values[d] if values and d < len(values) else default
    pad_low = int(field("pad", "0_0").split("_")[0])
    total *= _taps(out[out_labels.index(label)], lhs[lhs_labels.index(label)],
                   int(field("size", "1")), pad_low, int(field("stride", "1")),
                   int(field("lhs_dilate", "1")), int(field("rhs_dilate", "1")))
  return total


def _collective_bytes(inst: Instruction, shapes: dict[str, str], devices: int) -> float:
  op = inst.opcode.removesuffix("-start")
  if op not in _COLLECTIVES:
    return 0.0
  n = _group_size(inst.attrs, devices)
  if n <= 1 and op != "collective-permute":
    return 0.0
  operand = sum(sum(_arrays(shapes.get(o, ""), any_space=True)) for o in inst.operands)
  # An async start's type holds its operand beside its result: the result is the largest array.
  result = max(_arrays(inst.shape, any_space=True) or [0.0])
  share = (n - 1) / n
  if op == "all-gather":
    return result * share
  if op == "reduce-scatter":
    return operand * share
  if op == "all-reduce":
    return 2 * operand * share
  if op == "all-to-all":
    return operand * share
  return operand  # collective-permute


def _sliced_reads(fused: Computation) -> dict[int, float]:
  """Bytes a fusion reads of each parameter that it only slices (dynamic-slice, gather): the
  slices, not the whole operand (a scan's per-layer weights)."""
  params = {i.name: int(i.args) for i in fused.instructions if i.opcode == "parameter"}
  users: dict[str, list[Instruction]] = {}
  for i in fused.instructions:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  reads = {}
  for name, index in params.items():
    found = users.get(name, [])
    if found and all(u.opcode in ("dynamic-slice", "gather") and u.operands[0] == name
                     for u in found):
      reads[index] = sum(array_bytes(u.shape) for u in found)
  return reads


def _kernel_bytes(inst: Instruction, shapes: dict[str, str],
                  by_name: dict[str, Computation]) -> float:
  operands = [array_bytes(shapes.get(o, "")) for o in inst.operands]
  out = array_bytes(inst.shape)
  if inst.opcode == "copy-start":  # (destination, source, context): the source is the operand
    out = (_arrays(inst.shape) or [0.0])[0]
  elif inst.opcode.endswith("-start"):  # an async op's type holds its operands and its result
    out = _largest(inst.shape)
  root = None
  if inst.opcode == "fusion":
    m = re.search(r"calls=%([\w.\-]+)", inst.attrs)
    if m and m.group(1) in by_name and by_name[m.group(1)].instructions:
      fused = by_name[m.group(1)]
      root = fused.instructions[-1].opcode
      for index, read in _sliced_reads(fused).items():
        if index < len(operands):
          operands[index] = read
  elif inst.opcode in ("dynamic-slice", "gather", "slice", "slice-start") and operands:
    operands[0] = out  # the slice is read, not the whole operand
  if inst.opcode == "dynamic-update-slice" or root == "dynamic-update-slice":
    # In place: the buffer (the operand as large as the output) is not read or written whole.
    rest = sorted(operands)[:-1]
    return 2 * sum(rest)
  return out + sum(operands)


def hlo_costs(text: str, devices: int = 1) -> Costs:
  """The per-device costs of one run of the compiled program whose HLO text this is."""
  computations = parse(text)
  by_name = {c.name: c for c in computations}
  costs = Costs()
  mult = {c.name: 0.0 for c in computations}
  fused: set[str] = set()
  for c in computations:
    if c.entry:
      mult[c.name] = 1.0
  for c in reversed(computations):  # callers are printed after their callees
    for inst in c.instructions:
      factor = 1.0
      if inst.opcode == "while":
        trip = _trip_count(inst, by_name)
        if trip is None:
          costs.uncounted_loops += 1
        else:
          costs.loops.append(trip)
        factor = float(trip or 1)
      for kind, callee in _CALLED.findall(inst.attrs):
        if callee not in mult or kind == "to_apply":
          continue
        mult[callee] += mult[c.name] * (factor if kind in ("body", "condition") else 1.0)
        if kind == "calls" and inst.opcode != "call":
          fused.add(callee)  # a fusion's or an async op's computation: one kernel
      for branches in _BRANCHES.findall(inst.attrs):
        for callee in re.findall(r"%([\w.\-]+)", branches):
          if callee in mult:
            mult[callee] += mult[c.name]
  for c in computations:
    times = mult[c.name]
    if not times:
      continue
    shapes = c.shapes()
    for inst in c.instructions:
      costs.flops += times * _dot_flops(inst, shapes)
      costs.collective_bytes += times * _collective_bytes(inst, shapes, devices)
      if c.name in fused:
        continue
      if inst.opcode not in _FREE:
        costs.bytes += times * _kernel_bytes(inst, shapes, by_name)
  return costs


@dataclasses.dataclass
class Bound:
  """A program's step time at the target's peaks, per device."""
  compute_s: float
  memory_s: float
  collective_s: float

  @property
  def step_s(self) -> float:
    """At least this long: the three overlap perfectly."""
    return max(self.compute_s, self.memory_s, self.collective_s)

  @property
  def serial_s(self) -> float:
    """About this long if nothing overlapped."""
    return self.compute_s + self.memory_s + self.collective_s

  @property
  def limit(self) -> str:
    return max((("compute", self.compute_s), ("memory", self.memory_s),
                ("collectives", self.collective_s)), key=lambda x: x[1])[0]
