"""Accelerator specs, the collectives of a compiled XLA program (from its HLO text), and a roofline step time.

Everything here is arithmetic on numbers the compiler gave (`plan.py` gathers them); no JAX devices needed.
"""

import dataclasses
import math
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: float  # memory per chip
  hbm_bw: float  # bytes/s
  ici_bw: float  # bidirectional interconnect bytes/s per chip, all ports together
  ici_ports: int  # links per chip (2 per torus dimension)
  peak_flops: float  # dense bf16 FLOP/s per chip


# From the vendors' public pages (read November 2026), per chip:
#   v4:  cloud.google.com/tpu/docs/v4  275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s, 3D torus (6 ports). The page
#        gives no per-chip ICI figure, only "all-reduce bandwidth per Pod 1.1 PB/s" over 4,096 chips: 269 GB/s per
#        chip, and the v5e and v6e pages' pod all-reduce figures are exactly half their chips' bidirectional ICI
#        (51.2 TB/s / 256 = 400 / 2 GB/s; 102.4 TB/s / 256 = 800 / 2), so v4's is 537 GB/s bidirectional. It agrees
#        with the pod's 24 TB/s bisection (512 links cut: 47 GB/s per link each way) and with the JAX scaling book's
#        (jax-ml.github.io/scaling-book/tpus) 45 GB/s per link each way x 6 links x 2 = 540 GB/s.
#   v5e: cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional
#        (1,600 Gbps each way), 4 ports, 2D torus.
#   v5p: cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GiB HBM2e at 2,765 GB/s, ICI 1,200 GB/s
#        bidirectional (4,800 Gbps each way), 3D torus (6 ports).
#   v6e: cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB HBM at 1,638 GB/s, ICI 800 GB/s bidirectional,
#        4 ports, 2D torus.
#   GPUs (analytic plans only), NVIDIA's datasheets: H100 SXM 989 TFLOP/s dense bf16, 80 GB HBM3 at 3.35 TB/s,
#   NVLink 900 GB/s; A100 SXM 80GB 312 TFLOP/s bf16, 80 GB at 2.04 TB/s, NVLink 600 GB/s.
# "GB" is taken as 1e9 bytes where a page says GB, so a plan errs towards not fitting.
CHIPS = {
  "v4": Chip("TPU v4", 32 * 2**30, 1200e9, 2 * 1.1e15 / 4096, 6, 275e12),
  "v5e": Chip("TPU v5e", 16e9, 819e9, 400e9, 4, 197e12),
  "v5p": Chip("TPU v5p", 95 * 2**30, 2765e9, 1200e9, 6, 459e12),
  "v6e": Chip("TPU v6e", 32e9, 1638e9, 800e9, 4, 918e12),
  "h100": Chip("NVIDIA H100 SXM", 80e9, 3.35e12, 900e9, 2, 989e12),
  "a100": Chip("NVIDIA A100 SXM 80GB", 80e9, 2.039e12, 600e9, 2, 312e12),
}
TPUS = ("v4", "v5e", "v5p", "v6e")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ITEMSIZE = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = ")
_CALLS = re.compile(
  r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
  r"(\{[^}]*\}|%[\w.\-]+)"
)


def chip(name):
  """The Chip for a topology's generation, e.g. 'v5e:4x4' -> v5e; a one-line error for unknown ones."""
  key = name.split(":")[0].lower()
  if key not in CHIPS:
    raise ValueError(f"--topology={name}: unknown chip {key!r}; known: {', '.join(CHIPS)} (e.g. v5e:4x4, v5p:2x4x4)")
  return CHIPS[key]


def per_device(spec, devices_per_chip):
  """A chip's share per JAX device where each TensorCore is its own device (v4 without megacore)."""
  if devices_per_chip <= 1:
    return spec
  k = devices_per_chip
  return dataclasses.replace(
    spec,
    name=f"{spec.name} TensorCore (1/{k} chip)",
    hbm_bytes=spec.hbm_bytes / k,
    hbm_bw=spec.hbm_bw / k,
    ici_bw=spec.ici_bw / k,
    peak_flops=spec.peak_flops / k,
  )


def shape_bytes(text):
  """Bytes of every array in an HLO shape string (a tuple's elements summed)."""
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    if dtype in _ITEMSIZE or dtype.startswith("f8"):
      total += math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE.get(dtype, 1)
  return total


def _split_instruction(line):
  """(name, result shape, opcode, rest) of one HLO instruction line; the shape may be a nested tuple."""
  name = _INSTRUCTION.match(line).group(1)
  text = line[_INSTRUCTION.match(line).end() :]
  depth, end = 0, len(text)
  for i, ch in enumerate(text):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == " " and depth == 0:
      end = i
      break
  shape, rest = text[:end], text[end + 1 :]
  opcode = rest.split("(", 1)[0]
  return name, shape, opcode, rest


def parse_hlo(text):
  """{computation: [(name, shape, opcode, rest)]} and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{") and "%" in line:
      header = line.split("(", 1)[0].split()
      current = header[-1].lstrip("%")
      computations[current] = []
      if header[0] == "ENTRY":
        entry = current
    elif current and _INSTRUCTION.match(line):
      computations[current].append(_split_instruction(line))
  return computations, entry


def _trip_count(instructions):
  """A while loop's trip count from its condition `counter < constant` (how scans lower); 1 if not that."""
  constants = {name: rest for name, _, opcode, rest in instructions if opcode == "constant"}
  for _, _, opcode, rest in instructions:
    if opcode == "compare" and "direction=LT" in rest:
      for operand in re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0]):
        value = re.match(r"constant\((-?\d+)\)", constants.get(operand, ""))
        if value:
          return int(value.group(1))
  return 1


def multiplicities(computations, entry):
  """How many times each computation runs per execution of the entry: a while body runs trip-count times."""
  counts = {}

  def visit(caller, times):
    counts[caller] = counts.get(caller, 0) + times
    for _, _, opcode, rest in computations.get(caller, ()):
      if opcode.endswith(("-done", "-update")):  # an async op's later halves name the computation again
        continue
      trips = _trip_count(computations.get(_callee(rest, "condition"), ())) if opcode == "while" else 1
      for kind, target in _CALLS.findall(rest):
        for callee in re.findall(r"%?([\w.\-]+)", target.strip("{}")):
          visit(callee, times * (trips if kind == "body" else 1))

  visit(entry, 1)
  return counts


def _callee(rest, kind):
  found = re.search(kind + r"=%([\w.\-]+)", rest)
  return found.group(1) if found else None


def replica_group(rest, num_devices):
  """The device ids (partition numbers) of the first replica group of a collective."""
  mesh = re.search(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
    r" \{([^}]*)\}",
    rest,
  )
  if mesh:
    axes = re.findall(r"'(\w+)'=(\d+)", mesh.group(1))
    ids = np.arange(num_devices)
    if mesh.group(2):
      ids = ids.reshape([int(d) for d in mesh.group(2).split(",")])
      ids = ids.transpose([int(p) for p in mesh.group(3).split(",")]) if mesh.group(3) else ids
    ids = ids.reshape([int(size) for _, size in axes])
    chosen = [i for i, (axis, _) in enumerate(axes) if f"'{axis}'" in mesh.group(4)]
    kept = [i for i in range(len(axes)) if i not in chosen]
    return ids.transpose(kept + chosen).reshape(-1, math.prod(ids.shape[i] for i in chosen))[0].tolist()
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
  if iota:
    ids = np.arange(num_devices).reshape([int(d) for d in iota.group(3).split(",")])
    ids = ids.transpose([int(p) for p in iota.group(4).split(",")]) if iota.group(4) else ids
    return ids.reshape(int(iota.group(1)), int(iota.group(2)))[0].tolist()
  explicit = re.search(r"replica_groups=\{\{([\d,]+)\}", rest)
  if explicit:
    return [int(i) for i in explicit.group(1).split(",")]
  pairs = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", rest)  # collective-permute
  return [int(pairs.group(1)), int(pairs.group(2))] if pairs else list(range(num_devices))


def collectives(hlo_text, num_devices):
  """Every collective of a compiled program: kind, per-device buffer bytes, group, runs per step."""
  computations, entry = parse_hlo(hlo_text)
  counts = multiplicities(computations, entry)
  found = []
  for computation, instructions in computations.items():
    for _, shape, opcode, rest in instructions:
      kind = opcode.removesuffix("-start")
      if kind not in COLLECTIVES or counts.get(computation, 0) == 0:
        continue
      group = replica_group(rest, num_devices)
      if len(group) < 2:
        continue
      # The full buffer each device ends with (all-gather) or starts from (reduce-scatter: n times its output).
      # Async starts return (operands, results, ...): the result is the largest element.
      arrays = [shape_bytes(m.group(0)) for m in _ARRAY.finditer(shape)]
      size = max(arrays) if opcode.endswith("-start") else sum(arrays)
      size *= len(group) if kind == "reduce-scatter" else 1
      found.append({"kind": kind, "bytes": size, "group": group, "runs": counts[computation]})
  return found


def _group_bandwidth(group, devices, spec):
  """Bytes/s a device can receive within `group`: two links (both ring neighbours) per torus dimension the
  group spans, each at the chip's bidirectional ICI bandwidth over its ports."""
  coords = np.array([getattr(devices[i], "coords", (i,)) for i in group])
  spanned = max(1, int((coords.max(axis=0) != coords.min(axis=0)).sum()))
  return spanned * spec.ici_bw / spec.ici_ports


def comm_seconds(found, devices, spec):
  """Ring-algorithm time of each collective: (n-1)/n of the buffer crosses the links (twice for all-reduce:
  reduce-scatter then all-gather); a permute (XLA's collective matmuls step a ring of them) moves the buffer
  once, to a neighbour."""
  for c in found:
    n = len(c["group"])
    if c["kind"] == "collective-permute":
      # One hop per device; XLA's collective matmuls send the two ring directions at once, so a pair of
      # permutes shares one link's two directions.
      c["seconds"] = c["runs"] * c["bytes"] / (spec.ici_bw / spec.ici_ports)
      continue
    factor = 2 * (n - 1) / n if c["kind"] == "all-reduce" else (n - 1) / n
    c["seconds"] = c["runs"] * factor * c["bytes"] / _group_bandwidth(c["group"], devices, spec)
  return sum(c["seconds"] for c in found)


def summarize_collectives(found):
  """{kind: {count, bytes per step, seconds}} over every collective (a loop's run trip-count times)."""
  table = {}
  for c in found:
    row = table.setdefault(c["kind"], {"count": 0, "bytes": 0, "seconds": 0.0})
    row["count"] += c["runs"]
    row["bytes"] += c["runs"] * c["bytes"]
    row["seconds"] += c.get("seconds", 0.0)
  return table


def roofline(flops_per_device, model_flops_per_device, comm_s, tokens_per_step, spec):
  """Step-time bounds: compute at peak FLOP/s, communication at the ICI bandwidth, overlapped (max) and
  serial (sum), with the tokens/s and model-FLOPs utilization each bound implies."""
  compute_s = flops_per_device / spec.peak_flops
  bounds = {"overlapped": max(compute_s, comm_s), "serial": compute_s + comm_s}
  out = {"compute_s": compute_s, "comm_s": comm_s}
  for name, seconds in bounds.items():
    out[f"{name}_s"] = seconds
    out[f"{name}_tokens_per_s"] = tokens_per_step / seconds if seconds else float("inf")
    out[f"{name}_mfu"] = model_flops_per_device / (seconds * spec.peak_flops) if seconds else float("nan")
  return out


def device_count(target):
  """Devices in a target such as 'h100:8' or 'v5e:4x4' (the product of its shape)."""
  shape = target.partition(":")[2]
  if not re.fullmatch(r"\d+(x\d+)*", shape):
    raise ValueError(f"--topology={target}: expected CHIP:N or CHIP:AxB[xC], e.g. h100:8 or v5e:4x4")
  return math.prod(int(n) for n in shape.split("x"))
