"""Runs chunk_wkv7 forward + backward three times on one benchmark shape, for Nsight Compute.

The third call's four kernels are the ones to profile (the first two compile and warm up):
    SHAPE=8-4096-32 ncu --launch-skip 8 --launch-count 4 -k regex:chunk_ \
        --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
        python bench/wkv7_profile.py
Add `--metrics l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,...` for shared-memory traffic.
What this showed on the H200 is in bench/results/wkv7.md ("Where the time goes").
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from wkv7 import make_inputs  # noqa: E402

from kernels.wkv7 import chunk as ours  # noqa: E402


def main():
    import argparse
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("wkv7_profile: needs a CUDA GPU (run it under ncu on the GPU machine)")
    B, T, H = (int(x) for x in os.environ.get("SHAPE", "8-4096-32").split("-"))
    x = make_inputs(B, T, H, "cuda")
    leaves = {n: x[n].detach().requires_grad_() for n in "rwkvab"}
    dy = torch.randn_like(x["v"])
    for _ in range(3):
        y, _ = ours.chunk_wkv7(*(leaves[n] for n in "rwkvab"))
        y.backward(dy)
    torch.cuda.synchronize()
    print(f"B{B}-T{T}-H{H}: 3 x forward + backward done")


if __name__ == "__main__":
    main()
