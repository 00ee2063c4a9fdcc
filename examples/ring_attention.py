"""Context-parallel (ring) attention on the CPU: each process holds 1/P of the sequence.

Run with two processes on one machine:

    torchrun --nproc_per_node 2 examples/ring_attention.py

Every rank builds the same full q, k, v (same seed), keeps its zig-zag shard, and runs
exact causal attention over the whole sequence with ring_attention, forward and
backward.  Rank 0 then compares the reassembled output and gradients with
single-process attention and prints the largest differences (~1e-7 in float32).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import attnkit
from attnkit.distributed import ring_attention, shard, unshard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="full sequence length N (divisible by 2P)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA when < --heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores

    g = torch.Generator().manual_seed(0)  # the same full sequence on every rank
    q = torch.randn(1, args.heads, args.seq, args.head_dim, generator=g)  # (B, Hq, N, D)
    k = torch.randn(1, args.kv_heads, args.seq, args.head_dim, generator=g)  # (B, Hkv, N, D)
    v = torch.randn(1, args.kv_heads, args.seq, args.head_dim, generator=g)
    grad_out = torch.randn(1, args.heads, args.seq, args.head_dim, generator=g)

    # Each rank keeps chunks (rank, 2P-1-rank) of 2P: causal work is balanced.
    q_l, k_l, v_l = (shard(t).requires_grad_() for t in (q, k, v))  # (B, H, N/P, D)
    out_l = ring_attention(q_l, k_l, v_l, is_causal=True)  # this rank's rows of the full attention
    out_l.backward(shard(grad_out))

    out = unshard(out_l)  # collective: every rank calls it
    grads = [unshard(t.grad) for t in (q_l, k_l, v_l)]
    if rank == 0:
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attnkit.attention(*full, is_causal=True, method="tiled")
        ref.backward(grad_out)
        print(f"ring attention: P={world} ranks, N={args.seq} ({args.seq // world} per rank), "
              f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, causal")
        print(f"max |ring - single-process| output: {(out - ref).abs().max().item():.2e}")
        for name, got, t in zip(("dq", "dk", "dv"), grads, full):
            print(f"max |ring - single-process| {name}:     {(got - t.grad).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
