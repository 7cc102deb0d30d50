"""The device mesh of a training run, in one object (torchtitan's `ParallelDims`): the named
data-parallel dimensions, their sizes, the checks that they fit the world, and the meshes every
parallelism reads.

Every rank is data-parallel and reads its own data (as in torchtitan and Megatron):

- `dp_replicate` x `dp_shard` = the world. Dense parameters are sharded (FSDP2) over `dp_shard`
  and replicated over `dp_replicate` (HSDP when both are above 1; plain FSDP when `dp_replicate`
  is 1; plain replication, gradients all-reduced, when `dp_shard` is 1). One of them may be -1:
  whatever the world leaves.
- `ep` ranks form an expert-parallel group carved from consecutive ranks of one `dp_shard` group
  (so `ep` divides `dp_shard`): each holds `n_experts / ep` experts whole, tokens go to their
  experts by all-to-all inside the group, and the expert weights are replicated over the
  `world / ep` groups, whose gradients the trainer all-reduces (train/expert_parallel.py,
  train/parallelize.py).

Rank layout: rank = r * dp_shard + s for replica r and shard s; the expert groups are the runs of
`ep` consecutive ranks. Two meshes are built over that layout: `dense` ("dp_replicate",
"dp_shard") for FSDP/HSDP and `experts` ("ep_replicate", "ep") for the expert weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    ep: int
    world: int

    @classmethod
    def resolve(cls, dp_replicate: int, dp_shard: int, ep: int, world: int, n_experts: int | None) -> "ParallelDims":
        """Fill in a -1 and check everything against the world size and the model (`n_experts`:
        None for a dense model). Errors name the recipe keys (`parallel.*`) and what was expected."""
        if (dp_replicate, dp_shard).count(-1) > 1:
            raise ValueError("parallel.dp_replicate and parallel.dp_shard are both -1: at most one may take "
                             "what the world size leaves")
        for key, value in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard)):
            if value == 0 or value < -1:
                raise ValueError(f"parallel.{key} is {value}: expected a positive size or -1")
        if ep < 1:
            raise ValueError(f"parallel.ep is {ep}: expected a positive size")
        if dp_replicate == -1 or dp_shard == -1:
            known = dp_shard if dp_replicate == -1 else dp_replicate
            if world % known:
                raise ValueError(f"parallel.dp_{'shard' if dp_replicate == -1 else 'replicate'}={known} does not "
                                 f"divide the world size {world}")
            dp_replicate, dp_shard = (world // known, known) if dp_replicate == -1 else (known, world // known)
        if dp_replicate * dp_shard != world:
            raise ValueError(f"parallel.dp_replicate x parallel.dp_shard = {dp_replicate} x {dp_shard} = "
                             f"{dp_replicate * dp_shard}, expected the world size {world} (use -1 for one of them)")
        if ep > 1:
            if n_experts is None:
                raise ValueError(f"parallel.ep is {ep}, but the model is dense (no experts to shard): expected 1")
            if n_experts % ep:
                raise ValueError(f"parallel.ep={ep} does not divide the model's {n_experts} experts")
            if dp_shard % ep:
                raise ValueError(f"parallel.ep={ep} does not divide parallel.dp_shard={dp_shard}: an expert-parallel "
                                 f"group is carved from the ranks of one dp_shard group")
        return cls(dp_replicate, dp_shard, ep, world)

    @property
    def fsdp(self) -> bool:
        """Dense parameters are sharded (FSDP2, or HSDP with replicas)."""
        return self.dp_shard > 1

    @property
    def replicated(self) -> bool:
        """Several ranks, no sharding: the trainer all-reduces the dense gradients itself."""
        return self.world > 1 and not self.fsdp

    def dense_mesh(self, device_type: str):
        """("dp_replicate", "dp_shard") over every rank: FSDP2's mesh (2-D: HSDP)."""
        if self.dp_replicate == 1:
            return init_device_mesh(device_type, (self.dp_shard,), mesh_dim_names=("dp_shard",))
        return init_device_mesh(device_type, (self.dp_replicate, self.dp_shard),
                                mesh_dim_names=("dp_replicate", "dp_shard"))

    def expert_mesh(self, device_type: str):
        """("ep_replicate", "ep"): groups of `ep` consecutive ranks hold the experts between them."""
        return init_device_mesh(device_type, (self.world // self.ep, self.ep), mesh_dim_names=("ep_replicate", "ep"))


def dims_for(parallel, world: int, n_experts: int | None) -> ParallelDims:
    """The recipe's `parallel` section resolved for this world."""
    return ParallelDims.resolve(parallel.dp_replicate, parallel.dp_shard, parallel.ep, world, n_experts)

