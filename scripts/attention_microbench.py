"""Per-layer attention cost on this machine: the step plan of ``model/cascade.py`` (contexts read in
place, shared prefixes once) against gathering each sequence's whole context (what the portable path
did before), with their largest difference.

Cases: a prefill chunk over a cached context (one run, or a fragmented block table), a decode
step of 32 sequences in 4 groups sharing 2,048-token prefixes whose blocks are fragmented, and one of
32 unrelated sequences with 1,024-token contexts of their own.

    .venv/bin/python scripts/attention_microbench.py [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptcache.model import attention as A  # noqa: E402
from promptcache.model import cascade as C  # noqa: E402
from promptcache.model import cascade_plan as P  # noqa: E402
from promptcache.model import native  # noqa: E402

H, KVH, D = 9, 3, 64  # smollm2-135m's heads
BLOCK = 16


def timed(fn, *args, repeats: int = 10) -> tuple[float, torch.Tensor]:  # type: ignore[no-untyped-def]
    for _ in range(2):
        fn(*args)
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    return (time.perf_counter() - t) / repeats * 1000, out


def planned(q, k, v, kv, attn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    attn.cascade_plan = P.plan_cascade(attn, q.dtype, q.device)  # once per step: counted here too
    return C.paged_attention(q, k, v, kv, attn, D**-0.5)


def planned_native(q, k, v, kv, attn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    attn.cascade_plan = P.plan_cascade(attn, q.dtype, q.device, by_slot=True)  # the cpu-native backend's plan
    return C.paged_attention(q, k, v, kv, attn, D**-0.5, cpu_kernel="native")


def gathered(q, k, v, kv, attn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    A.write_kv(kv, k, v, attn.slot_mapping)
    outs = []
    for i in range(attn.num_seqs):
        lo, hi, ctx = attn.query_start_loc[i], attn.query_start_loc[i + 1], attn.seq_lens[i]
        idx = torch.tensor(A.slots_after(attn.context_runs[i], 0))
        kc, vc = kv[0].index_select(1, idx).unsqueeze(0), kv[1].index_select(1, idx).unsqueeze(0)
        mask = torch.zeros(hi - lo, ctx, dtype=q.dtype)
        mask.masked_fill_(torch.arange(ctx).unsqueeze(0) > torch.arange(ctx - (hi - lo), ctx).unsqueeze(1), -torch.inf)
        out = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1).unsqueeze(0), kc, vc, attn_mask=mask,
                                             scale=D**-0.5, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def step(tables: list[tuple[list[int], int, int]], dt: torch.dtype):  # type: ignore[no-untyped-def]
    """AttentionMetadata and inputs for sequences (block table, cached tokens, new tokens)."""
    starts, lens, ctx_runs, slots = [0], [], [], []
    for blocks, cached, n in tables:
        runs = A.runs_of_blocks(blocks, cached + n, BLOCK)
        ctx_runs.append(runs)
        slots += A.slots_after(runs, cached)
        lens.append(cached + n)
        starts.append(starts[-1] + n)
    t = starts[-1]
    q, k, v = torch.randn(t, H, D).to(dt), torch.randn(t, KVH, D).to(dt), torch.randn(t, KVH, D).to(dt)
    return q, k, v, A.AttentionMetadata(torch.tensor(slots), starts, lens, ctx_runs)


def cases() -> list[tuple[str, list[tuple[list[int], int, int]]]]:
    prefix = 2048 // BLOCK
    out = []
    for cached, n in ((1920, 128), (1920, 512)):
        nb = -(-(cached + n) // BLOCK)
        out.append((f"prefill {n} over {cached}, one run", [(list(range(nb)), cached, n)]))
        out.append((f"prefill {n} over {cached}, fragmented", [(list(range(nb))[::-1], cached, n)]))
    groups = []
    for g in range(4):  # each group's prefix in descending block ids (as LRU eviction hands them out)
        shared = list(range((g + 1) * prefix - 1, g * prefix - 1, -1))
        for j in range(8):
            own = [4 * prefix + 8 * (8 * g + j) + b for b in range(8)]
            groups.append((shared + own, 2048 + 64 + 5, 1))
    out.append(("32 decodes, 4 groups, fragmented prefixes", groups))
    # unrelated chats decoding together: each its own 1,024-token context, blocks in descending ids
    first = 4 * prefix + 8 * 32
    lone = [(list(range(first + 65 * (i + 1) - 1, first + 65 * i - 1, -1)), 1024, 1) for i in range(32)]
    out.append(("32 lone decodes, 1,024-token contexts, fragmented", lone))
    return out


def kernel_rates() -> None:
    """The CPU attention kernels' rates by shape (they bound prefill over long contexts): PyTorch's
    flash kernel, and promptcache's own (model/native.py: bf16 with AVX512-BF16, float32 with AVX2)
    where this CPU runs it."""
    print("\n| dtype | heads x queries x keys | causal | PyTorch ms | GFLOP/s | native ms | GFLOP/s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for dt in (torch.bfloat16, torch.float32):
        lib = native.library_for(dt)
        shapes = ((9, 2048, 2048, True), (3, 6144, 2048, False), (3, 384, 1920, False), (3, 24, 2048, False))
        for h, m, n, causal in shapes:
            q, k, v = (torch.randn(1, h, length, D).to(dt) for length in (m, n, n))
            ms, _ = timed(lambda q=q, k=k, v=v, causal=causal: flash(q, k, v, is_causal=causal, scale=D**-0.5)[0])
            flops = 4 * h * m * n * D / (2 if causal else 1)
            name = str(dt).removeprefix("torch.")
            ours = "| – | –"
            if lib is not None:
                ns, _ = timed(lambda q=q, k=k, v=v, causal=causal, lib=lib: lib.flash(q, k, v, D**-0.5, causal))
                ours = f"| {ns:.2f} | {flops / ns / 1e6:.0f}"
            print(f"| {name} | {h} x {m} x {n} | {causal} | {ms:.2f} | {flops / ms / 1e6:.0f} {ours} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    torch.set_num_threads(ap.parse_args().threads)
    print("| dtype | case | planned (ms) | planned, native kernel (ms) | gathered (ms) | max diff |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    slots = (max(b for _, tables in cases() for blocks, _, _ in tables for b in blocks) + 1) * BLOCK
    for dt in (torch.bfloat16, torch.float32):
        kv = torch.randn(2, KVH, slots, D).to(dt)
        for name, tables in cases():
            q, k, v, attn = step(tables, dt)
            new_ms, new = timed(planned, q, k, v, kv, attn)
            old_ms, old = timed(gathered, q, k, v, kv, attn)
            diff = (new.float() - old.float()).abs().max().item()
            nat = "–"
            if native.library_for(dt) is not None:
                nat_ms, nat_out = timed(planned_native, q, k, v, kv, attn)
                nat = f"{nat_ms:.2f}"
                diff = max(diff, (nat_out.float() - old.float()).abs().max().item())
            print(f"| {str(dt).removeprefix('torch.')} | {name} | {new_ms:.2f} | {nat} | {old_ms:.2f} | {diff:.1e} |")
    kernel_rates()


if __name__ == "__main__":
    main()
