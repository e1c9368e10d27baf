"""``make bench``: pyvirt side by side with C and QEMU; prints medians and ratios.

    python -m bench [--runs N] [--only kvm,emu,blk,life,net]
"""

from __future__ import annotations

import argparse
import platform

from bench.common import print_rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--runs", type=int, default=5, help="runs per side (alternating)")
    ap.add_argument("--only", default="kvm,emu,blk,life,net",
                    help="comma-separated: kvm, emu, blk, life, net")
    args = ap.parse_args()
    which = set(args.only.split(","))
    print(f"pyvirt benchmarks on {platform.node()} ({platform.machine()}, "
          f"kernel {platform.release()}), {args.runs} runs per side")
    if "kvm" in which:
        from bench import kvm_bench

        print_rows("KVM backend, small test guest", kvm_bench.run(args.runs))
    if "emu" in which:
        from bench import emu_bench

        print_rows("software CPU, default Linux guest", emu_bench.run(args.runs))
    if "blk" in which:
        from bench import blk_bench

        print_rows("virtio-blk, fio in the Debian rootfs guest, software CPU",
                   blk_bench.run(args.runs))
    if "life" in which:
        from bench import lifecycle_bench

        print_rows("lifecycle: pause, resume, snapshot, restore; default guest, software CPU",
                   lifecycle_bench.run(args.runs))
    if "net" in which:
        from bench import net_bench

        print_rows("networking: iperf3, ping, vsock; Debian rootfs guest, software CPU",
                   net_bench.run(args.runs))


if __name__ == "__main__":
    main()
