"""torchrun worker for tests/test_loss.py::test_weight_sum_grads_match_under_torchrun (not a test itself).

Usage: torchrun --nproc_per_node=2 tests/_dist_grad_worker.py SPEC.pt OUT.pt

SPEC.pt holds a tiny LlamaConfig, its state dict, the step's examples, the micro-batch size and the
normaliser modes. Each rank takes its contiguous share of the examples, splits it into micro-batches,
runs a DDP (gloo, CPU) accumulation step per mode through pipeline.loss.WeightedLossModel (DDP wraps
it, as in the trainer) and rank 0 saves the all-reduced gradients and the step loss (mean over ranks
of the summed micro-batch losses) to OUT.pt.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(1)


def main(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.loss import WeightedLossModel, WeightedLossOutput, step_normalisers
    from pipeline.preprocess import Collator

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = torch.load(spec_path, weights_only=False)
    model = LlamaForCausalLM(LlamaConfig(**spec["config"])).to(spec["dtype"])
    model.load_state_dict(spec["state"])
    ddp = DDP(WeightedLossModel(model, label_smoothing=spec.get("label_smoothing", 0.0)))
    examples = spec["examples"]
    per_rank = len(examples) // world
    mine = examples[rank * per_rank : (rank + 1) * per_rank]
    mbs_size = spec["micro_batch_size"]
    collate = Collator(pad_token_id=0)
    mbs = [collate(mine[i : i + mbs_size]) for i in range(0, len(mine), mbs_size)]
    out = {"world": world}
    for mode in spec["modes"]:
        model.zero_grad(set_to_none=True)
        dens = step_normalisers(mbs, mode)
        step_loss = torch.zeros((), dtype=torch.float64)
        for k, mb in enumerate(mbs):
            sync = contextlib.nullcontext() if k == len(mbs) - 1 else ddp.no_sync()
            with sync:
                res = WeightedLossOutput(**ddp(**mb, normaliser=dens[k]))
                res.loss.backward()
            step_loss += res.loss.detach().to(torch.float64)
        dist.all_reduce(step_loss, op=dist.ReduceOp.SUM)
        out[mode] = {
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            "loss": step_loss / world,
            "denominators": [float(d) for d in dens],
        }
    if rank == 0:
        torch.save(out, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
