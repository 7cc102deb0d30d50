"""Runs the trainer's step on fixed micro-batches in several layouts, then `mm1 train` runs, for
tests/train/test_layouts.py.

    torchrun --nproc-per-node N -m tests.train.layouts_worker SPEC.json OUT.json

SPEC: {"state": {model name: file of a saved fp32 state dict}, "batches": {model name: file of
the micro-batches}, "steps": 3, "alone": [layout, ...], "layouts": [{"name", "model",
"dp_replicate", "dp_shard", "ep", "capacity_factor" (MoE: a float, or null for dropless),
"activation_checkpointing"}, ...], "cli": [{"name", "argv"}, ...]}.
Rank 0 first runs the "alone" layouts as one process (world 1: before it joins the process
group, so none exists yet); then every rank runs the "layouts" over the whole world. Every
layout runs `steps` steps of the same global batch split over its world: rank r takes
micro-batches [r * accum, (r + 1) * accum) of each step, accum = global / world (global: the
layout's "global", 4 by default). Rank 0 writes, per layout, each step's loss and grad norm, and
the MoE routing of every micro-batch of the last step (gathered from every rank, in micro-batch
order). Then every rank runs each "cli" entry's `mm1 train` argv through the CLI's own `main` in
this process (torchrun's environment, the group already formed: the imports and the group paid
once); the process exits with the first non-zero status."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist

GLOBAL = 4  # micro-batches per step


def recipe_for(layout: dict):
    from train.recipe import parse_train_recipe

    return parse_train_recipe({
        "name": layout["name"], "model": {"name": layout["model"]}, "steps": 3, "precision": "fp32",
        "data": {"outs": ["unused"], "tokenizer": "unused", "seq_len": 64},
        "optim": {"lr": 1e-2, "warmup": 0, "grad_clip": 1.0},
        "parallel": {"dp_replicate": layout.get("dp_replicate", 1), "dp_shard": layout.get("dp_shard", -1),
                     "ep": layout.get("ep", 1),
                     "activation_checkpointing": layout.get("activation_checkpointing", "none")},
        "deterministic": True,
    })


def model_cfg(recipe, layout: dict):
    from train.trainer import model_config

    cfg = model_config(recipe, vocab=512, image_token_id=511)
    moe = cfg.decoder.moe
    if moe is not None and "capacity_factor" in layout:
        cfg = replace(cfg, decoder=replace(cfg.decoder, moe=replace(moe, capacity_factor=layout["capacity_factor"])))
    return cfg


def run_layout(layout: dict, spec: dict, rank: int, world: int) -> dict:
    from train.mesh import ParallelDims
    from train.schedule import lr_lambda
    from train.trainer import build_model, build_optimizer, train_step

    recipe = recipe_for(layout)
    cfg = model_cfg(recipe, layout)
    moe = cfg.decoder.moe
    dims = ParallelDims.resolve(recipe.parallel.dp_replicate, recipe.parallel.dp_shard, recipe.parallel.ep, world,
                                moe.n_experts if moe else None)
    state = torch.load(spec["state"][layout["model"]], weights_only=True) if rank == 0 else None
    model = build_model(recipe, cfg, dims, torch.device("cpu"), state=state)
    routed = [m for m in model.modules() if hasattr(m, "record_routing")]
    for m in routed:
        m.record_routing = True
    optimizer = build_optimizer(model, recipe.optim, 1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s + 1, 0, spec["steps"], 0.1))
    batches = torch.load(spec["batches"][layout["model"]], weights_only=True)
    per_step = layout.get("global", GLOBAL)
    accum = per_step // world
    from train.expert_parallel import expert_parameters

    experts = expert_parameters(model)
    out = {"loss": [], "grad_norm": [], "routing": [],
           # how the expert weights are laid out, and what one rank holds of the first one
           "expert_placements": str(experts[0].placements) if experts else None,
           "expert_local_shape": list(experts[0].to_local().shape) if experts else None}
    for step in range(spec["steps"]):
        mine = batches[step * per_step + rank * accum: step * per_step + (rank + 1) * accum]
        routing = []
        if routed:
            # the routing of each micro-batch, read after its forward (a hook on the last MoE layer)
            def grab(module, args, output):
                routing.append([m.last_routing[0].tolist() for m in routed])
            handle = routed[-1].register_forward_hook(grab)
        result = train_step(model, optimizer, mine, dims=dims, device=torch.device("cpu"), grad_clip=1.0)
        scheduler.step()
        if routed:
            handle.remove()
        out["loss"].append(result.loss)
        out["grad_norm"].append(result.grad_norm)
        if step == spec["steps"] - 1 and routed:
            gathered = [None] * world
            if world > 1:
                dist.all_gather_object(gathered, routing[:accum])  # forwards only (no recomputation)
            else:
                gathered = [routing[:accum]]
            out["routing"] = [r for part in gathered for r in part]
    return out


def main(spec_path: str, out_path: str) -> int:
    from train.trainer import init_distributed, seed_everything

    spec = json.loads(open(spec_path).read())
    seed_everything(0, True)
    results = {}
    if int(os.environ.get("RANK", 0)) == 0:
        for layout in spec.get("alone", []):
            results[layout["name"]] = run_layout(layout, spec, 0, 1)
    d = init_distributed()
    for layout in spec["layouts"]:
        results[layout["name"]] = run_layout(layout, spec, d.rank, d.world)
    if d.rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    status = 0
    for run in spec.get("cli", []):
        from tools.cli import main as mm1

        code = mm1(run["argv"])
        status = status or code
    if d.owns_group:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1], sys.argv[2]))
