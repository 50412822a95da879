"""A model of the attention backward's dK/dV CTA orders (csrc/cuda/dkdv_order.h), for choosing a default
without a GPU. Not a measurement: `python scripts/cuda_diagnostics.py attn-order` times the orders on one.

    python scripts/cta_order_model.py [--sms 132] [--l2_mb 50]

The model: every SM runs CTAs_per_SM CTAs side by side (slots), each CTA one query tile of 64 rows per step,
all slots in lockstep; a slot that frees takes the next CTA of the order. A CTA of key tile kt (128 keys)
walks the query tiles from its diagonal to T. Every step reads that tile's rows of its head (Q and dO, and
for the fused schemes adds into the fp32 dQ rows) through one LRU cache the size of the L2. It prints, per
order, the run's length over a perfectly balanced one and the rows read from device memory over one read
of each.
"""
import argparse
from collections import OrderedDict

BC, BR = 128, 64  # keys per CTA, query rows per step

# (B, H, T, D), the benchmark shapes of the attention targets, and the default schemes' CTAs per SM and bytes
# per row a head's CTAs share (bf16 Q and dO, fp32 dQ: both defaults add dQ with atomics)
SHAPES = (((32, 12, 512, 64), 2), ((8, 12, 2048, 64), 2), ((2, 12, 8192, 64), 2), ((4, 16, 4096, 128), 1))


def order(heads, key_tiles, head_group, phases):
    """The CTAs (bh, kt) in the order they start: dkdv_order.h's order, stated as a sort."""
    span = -(-key_tiles // phases)
    ctas = [(bh, kt) for kt in range(key_tiles) for bh in range(heads)]
    return sorted(ctas, key=lambda c: (c[1] // span, c[0] // head_group, c[1], c[0]))


def simulate(ctas, T, slots, cache_tiles):
    n_q = -(-T // BR)
    work = sum(n_q - kt * BC // BR for _, kt in ctas)
    cache, reads, steps, nxt = OrderedDict(), 0, 0, 0
    running = [None] * slots  # per slot: [bh, next query tile]
    while True:
        for i in range(slots):
            if running[i] is None and nxt < len(ctas):
                bh, kt = ctas[nxt]
                running[i], nxt = [bh, kt * BC // BR], nxt + 1
        if all(r is None for r in running):
            break
        steps += 1
        for i, r in enumerate(running):
            if r is None:
                continue
            tile = (r[0], r[1])
            if tile in cache:
                cache.move_to_end(tile)
            else:
                reads += 1
                cache[tile] = True
                if len(cache) > cache_tiles:
                    cache.popitem(last=False)
            r[1] += 1
            if r[1] == n_q:
                running[i] = None
    heads = len({bh for bh, _ in ctas})
    return steps / (work / slots), reads / (heads * n_q)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sms", type=int, default=132, help="SMs (an H100 SXM: 132)")
    ap.add_argument("--l2_mb", type=float, default=50, help="L2 cache in MB (an H100: 50)")
    args = ap.parse_args()
    l2 = int(args.l2_mb * 2**20)
    for (B, H, T, D), per_sm in SHAPES:
        heads, key_tiles, row_bytes = B * H, -(-T // BC), D * (2 * 2 + 4)
        group = max(1, min(heads, l2 // 4 // (T * row_bytes)))  # default_dkdv_order's group size
        cache_tiles = l2 // (BR * row_bytes)
        orders = {"grid order": (heads, 1), f"groups of {group}, 1 phase": (group, 1),
                  f"groups of {group}, 3 phases": (group, 3), "one head (FlashAttention-2)": (1, 1)}
        cells = []
        for name, (g, p) in orders.items():
            length, reads = simulate(order(heads, key_tiles, g, p), T, args.sms * per_sm, cache_tiles)
            cells.append(f"{name} {length:.2f}x {reads:.1f}x")
        print(f"{(B, H, T, D)}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
