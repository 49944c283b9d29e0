"""Ranks of a multi-process run: torchrun's command line, the per-rank batch, and small rank helpers.

Training on N GPUs is torch's own data parallelism driven by torchrun (torch.distributed.run): each rank
holds the 4-bit base and trains on its share of every global batch; the Trainer (through accelerate)
all-reduces the LoRA gradients. Nothing here is home-made beyond choosing arguments and agreeing on a stop.
Every function reads the environment torchrun gives each rank (RANK, WORLD_SIZE), so a single process is
simply rank 0 of 1.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from qlora_app.errors import UserError

RANK_MODULE = "qlora_app.train.rank"
# How long torchrun waits, after forwarding SIGTERM/SIGINT, for the ranks to finish their step and save the
# checkpoint before it kills them.
GRACE_SECONDS = 300


@dataclass(frozen=True)
class Nodes:
    """Where this machine sits among several: node_rank of count, all meeting at addr:port (node 0)."""

    count: int = 1
    rank: int = 0
    addr: str | None = None
    port: int = 29500

    def check(self) -> None:
        """Refuse what torchrun could not start, before a run directory exists."""
        if self.count > 1 and not self.addr:
            raise UserError("training on several nodes needs the address of node 0: --master-addr HOST")


def torchrun_args(gpus: int, nodes: Nodes, rank_args: list[str], log_dir: str) -> list[str]:
    """torchrun's arguments (without the program name): gpus ranks on this node, every local rank but 0
    writing to files under log_dir (rank 0 keeps the terminal: progress bar and summary)."""
    if nodes.count == 1:
        where = ["--standalone", "--nnodes", "1"]  # a free local port, no address to agree on
    else:
        nodes.check()
        where = ["--nnodes", str(nodes.count), "--node-rank", str(nodes.rank),
                 "--master-addr", nodes.addr, "--master-port", str(nodes.port)]
    quiet = ",".join(f"{r}:3" for r in range(1, gpus))
    logs = ["--log-dir", log_dir] + (["--redirects", quiet] if quiet else [])
    return [*where, "--nproc-per-node", str(gpus), "--max-restarts", "0", "--shutdown-timeout",
            str(GRACE_SECONDS), *logs, "--module", RANK_MODULE, *rank_args]


def torchrun_command(gpus: int, nodes: Nodes, rank_args: list[str], log_dir: str,
                     python: str = sys.executable) -> list[str]:
    """The same launch as a shell command line (what the README shows for launching nodes by hand)."""
    return [python, "-m", "torch.distributed.run", *torchrun_args(gpus, nodes, rank_args, log_dir)]


def node_command(gpus: int, nodes: Nodes, rank_args: list[str], log_dir: str) -> str:
    """torchrun_command quoted for a shell: what node 0 prints for the others to paste (the layout is JSON)."""
    import shlex

    return shlex.join(torchrun_command(gpus, nodes, rank_args, log_dir))



def fsdp_args(recipe) -> dict:
    """TrainingArguments that make the Trainer shard with FSDP (train.distributed: fsdp on several ranks).

    FSDP2 wraps each decoder layer (the model's _no_split_modules); cpu_ram_efficient_loading lets rank 0 alone
    read the checkpoint while the others build the model on the meta device and receive their shards, so the
    host needs the model's RAM once. The 4-bit storage dtype that makes the base shardable is set where the
    model is loaded (model_loading.quantization_config). accelerate 1.15 shards only across accelerators: on
    CPU (gloo) these arguments leave it data parallel, which the launcher says."""
    if recipe.train.distributed != "fsdp" or world_size() == 1:
        return {}
    return {"fsdp": True,
            "fsdp_config": {"version": 2, "cpu_ram_efficient_loading": True, "reshard_after_forward": True}}


def launch_flags(ranks: int, per_node: int) -> str:
    """The --gpus/--nodes flags that start `ranks` ranks again, `per_node` on each machine."""
    if ranks <= 1:
        return ""
    nodes = ranks // per_node
    return f" --gpus {per_node}" + (f" --nodes {nodes}" if nodes > 1 else "")


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def bind_device() -> None:
    """This rank's GPU is LOCAL_RANK's: loading puts the base on the current device."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def max_over_ranks(value: int) -> int:
    """The largest value any rank holds (every rank must call it at the same point)."""
    if not _initialized():
        return value
    import torch
    import torch.distributed as dist

    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()
