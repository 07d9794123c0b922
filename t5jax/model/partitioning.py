"""The mesh axes and the one table from the model's logical axis names onto them; t5jax/parallel.py builds
meshes and shardings from these, and the model (moe.py's explicit all-to-all) reads the axis names it needs.
"""

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over
EXPERT_AXIS, TENSOR_AXIS = "expert", "tensor"
# MoE's explicit all-to-all (moe.py) splits its routing groups over the batch axes and the expert axis: the
# tokens a device routes are its own, and the ones it receives come from the devices sharing its batch slice.
EXPERT_GROUP_AXES = BATCH_AXES + (EXPERT_AXIS,)

# Logical axis -> mesh axes. The batch is split over data and fsdp (fsdp is data parallelism whose params are
# sharded too); embed over fsdp shards every weight matrix along d_model (ZeRO-3 style); mlp/heads/vocab over
# tensor is Megatron-style model parallelism; experts over expert. Unlisted axes are replicated.
AXIS_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("vocab", "tensor"),
  ("experts", "expert"),
)


def logical_spec(logical_axes):
  """The mesh PartitionSpec of one tuple of logical axis names (None: replicated along that dimension)."""
  return nn.logical_to_mesh_axes(logical_axes, AXIS_RULES)


def expert_parallel_mesh():
  """The mesh that code being traced runs on, if its expert axis has several devices to exchange tokens
  between (and is not already manual, as inside mode 'pmap'); else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.shape.get(EXPERT_AXIS, 1) == 1 or EXPERT_AXIS in mesh.manual_axes:
    return None
  return mesh
