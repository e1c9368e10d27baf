"""Loading a bzImage (``load_kernel`` → ``parse_bzimage``; the payload decompressed on
the host — gzip, xz, lzma, bzip2, zstd, unsupported or corrupt — and its ELF
loaded, or the bzImage loaded as is), then ``setup_linux_boot``, for fuzzer-made
setup headers and payloads in 64 MiB of RAM.

Documented outcome: ``LoaderError`` naming the file and the problem."""

from __future__ import annotations

from fuzz.common import Provider
from fuzz.kernels import bzimage
from fuzz.loading import boot

MAX_LEN = 8192


def one_input(data: bytes) -> None:
    fdp = Provider(data)
    blob = bzimage(fdp) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeBytes(MAX_LEN)
    boot(fdp, blob)
