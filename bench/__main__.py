"""``make bench``: pyvirt side by side with C and QEMU; prints medians and ratios.

    python -m bench [--runs N] [--only kvm,emu,blk,life,net,daemon,web] [--images raw,...]
"""

from __future__ import annotations

import argparse
import platform

from bench.common import print_rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--runs", type=int, default=5, help="runs per side (alternating)")
    ap.add_argument("--only", default="kvm,emu,blk,life,net,daemon,web",
                    help="comma-separated: kvm, emu, blk, life, net, daemon, web")
    ap.add_argument("--images", default="raw,qcow2-fresh,qcow2-allocated,qcow2-chain",
                    help="blk: the scratch disks' kinds, comma-separated: raw, qcow2-fresh, "
                         "qcow2-allocated, qcow2-chain")
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

        images = args.images.split(",")
        if unknown := [k for k in images if k not in blk_bench.IMAGES]:
            ap.error(f"--images: unknown kind {unknown[0]!r} "
                     f"(known: {', '.join(blk_bench.IMAGES)})")
        for kind, rows in blk_bench.run(args.runs, images):
            print_rows(f"virtio-blk, fio in the Debian rootfs guest, software CPU, {kind} disk",
                       rows)
    if "life" in which:
        from bench import lifecycle_bench

        print_rows("lifecycle: pause, resume, snapshot, restore; default guest, software CPU",
                   lifecycle_bench.run(args.runs))
    if "net" in which:
        from bench import net_bench

        print_rows("networking: iperf3, ping, vsock; Debian rootfs guest, software CPU",
                   net_bench.run(args.runs))
    if "daemon" in which:
        from bench import daemon_bench

        print_rows("management: pyvirtd + CLI (vs virsh/libvirtd 9.0 where named); default "
                   "guest, software CPU", daemon_bench.run(args.runs))
    if "web" in which:
        from bench import web_bench

        print_rows("web GUI in Debian's Chromium (Playwright); default guest, software CPU",
                   web_bench.run(args.runs))


if __name__ == "__main__":
    main()
