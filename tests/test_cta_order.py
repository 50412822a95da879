"""The order of the attention backward's dK/dV CTAs (csrc/cuda/dkdv_order.h), checked on the CPU.

The CUDA kernels take their (batch·head, key tile) from dkdv_tile; a wrong map would leave key tiles without
gradients or compute some twice, and only at the sizes where the default order differs from the grid's
(large ones). The header is plain C++, so this compiles it with the host compiler into a small program and
compares its map, for every head-group size and phase count of many grids, with the order stated as a sort.
"""
import itertools
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = r"""
#include <cstdio>
#include "attention_dropout.h"  // first, as kernels.h includes it: the two share MINILM_HOST_DEVICE
#include "cuda/dkdv_order.h"
// stdin: lines "map heads key_tiles head_group phases" or "default heads T row_bytes l2_bytes"
int main() {
  char what[16];
  long long a, b, c, d;
  while (std::scanf("%15s %lld %lld %lld %lld", what, &a, &b, &c, &d) == 5) {
    if (what[0] == 'm') {
      const minilm_cuda::DkdvOrder order{static_cast<int>(c), static_cast<int>(d)};
      for (int lin = 0; lin < a * b; ++lin) {
        const minilm_cuda::DkdvTile t = minilm_cuda::dkdv_tile(lin, static_cast<int>(a), static_cast<int>(b), order);
        std::printf("%d %d ", t.bh, t.kt);
      }
    } else {
      const minilm_cuda::DkdvOrder o = minilm_cuda::default_dkdv_order(a, b, c, d);
      std::printf("%d %d", o.head_group, o.phases);
    }
    std::printf("\n");
  }
}
"""


@pytest.fixture(scope="module")
def order_program(tmp_path_factory):
    cxx = shlex.split(os.environ.get("CXX", "c++"))  # the compiler that builds the extension (e.g. "ccache g++")
    if not cxx or shutil.which(cxx[0]) is None:
        pytest.skip(f"no C++ compiler ({' '.join(cxx)}) to build the test program")
    d = tmp_path_factory.mktemp("cta_order")
    (d / "main.cpp").write_text(PROGRAM)
    exe = str(d / "order")
    build = subprocess.run([*cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc"),
                            str(d / "main.cpp"), "-o", exe], capture_output=True, text=True)
    assert build.returncode == 0, f"the test program did not compile:\n{build.stderr}"

    def run(lines):
        out = subprocess.run([exe], input="\n".join(lines) + "\n", check=True, capture_output=True, text=True)
        return [list(map(int, line.split())) for line in out.stdout.splitlines()]
    return run


def expected_order(heads, key_tiles, head_group, phases):
    """dkdv_order.h's order as a sort: (key-tile range, head group, key tile, head)."""
    span = -(-key_tiles // phases)
    ctas = itertools.product(range(heads), range(key_tiles))
    return sorted(ctas, key=lambda c: (c[1] // span, c[0] // head_group, c[1], c[0]))


def test_every_cta_order_is_the_sorted_order(order_program):
    cases = [(h, kt, g, p) for h in (1, 2, 3, 5, 7, 12) for kt in (1, 2, 3, 4, 7, 10)
             for g in range(1, h + 1) for p in range(1, kt + 2)]
    maps = order_program([f"map {h} {kt} {g} {p}" for h, kt, g, p in cases])
    assert len(maps) == len(cases)
    for (h, kt, g, p), flat in zip(cases, maps):
        got = list(zip(flat[0::2], flat[1::2]))
        assert got == expected_order(h, kt, g, p), f"heads {h}, key tiles {kt}, head group {g}, phases {p}"


def test_the_grid_order_and_flash_attentions(order_program):
    # one group of every head, or one key tile per phase: the grid's own order (heads fastest);
    # groups of one head in one phase: FlashAttention-2's (key tiles fastest)
    grid = [(lin % 6, lin // 6) for lin in range(6 * 5)]
    flash = [(lin // 5, lin % 5) for lin in range(6 * 5)]
    maps = order_program(["map 6 5 6 1", "map 6 5 6 3", "map 6 5 2 5", "map 6 5 1 1"])
    for flat, want in zip(maps, (grid, grid, grid, flash)):
        assert list(zip(flat[0::2], flat[1::2])) == want


def test_the_default_order(order_program):
    l2 = 50 << 20
    rows = 128 * 8  # bytes per row at head dim 128: bf16 Q and dO, fp32 dQ
    got = order_program([f"default 64 4096 {rows} {l2}",   # 256 MB of rows: over four L2s
                         f"default 48 4096 {rows} {l2}",   # 192 MB: within
                         f"default 64 4096 {rows} 0",      # L2 unknown
                         f"default 2 1000000 {rows} {l2}"])  # one head over a quarter of the L2
    assert got == [[3, 3], [48, 3], [64, 3], [1, 3]]
