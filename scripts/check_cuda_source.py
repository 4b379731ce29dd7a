"""Compile the GPU kernels' CUDA source with NVRTC, without a GPU, and list the kernels.

A GPU session is short and rare; a kernel that does not compile would waste it. NVRTC
compiles without a device, so this runs on any x86-64 Linux machine:

    python3 -m venv /tmp/nvrtc && /tmp/nvrtc/bin/pip install -q nvidia-cuda-nvrtc-cu12 numpy scipy
    PYTHONPATH=. /tmp/nvrtc/bin/python scripts/check_cuda_source.py [--arch compute_90]

Exit status 0 and the list of kernel entry points when the source compiles; the compiler's
log and status 1 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import sys


def _nvrtc():
    import nvidia.cuda_nvrtc as pkg  # a namespace package: no __file__

    libs = sorted(f for d in pkg.__path__ for f in glob.glob(os.path.join(d, "lib", "libnvrtc.so*")))
    if not libs:
        sys.exit("libnvrtc not found in the nvidia-cuda-nvrtc package")
    return ctypes.CDLL(libs[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="compute_90", help="virtual architecture (default compute_90: Hopper)")
    args = ap.parse_args()
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "daskptycho", "physics", "cuda.py")) as f:
        text = f.read()
    source = re.search(r'SOURCE = r"""(.*?)"""', text, re.S).group(1).encode()
    nv = _nvrtc()
    prog = ctypes.c_void_p()
    if nv.nvrtcCreateProgram(ctypes.byref(prog), source, b"daskptycho_kernels.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [b"-std=c++14", f"-arch={args.arch}".encode()]
    status = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetProgramLog(prog, log)
    if status:
        print(log.value.decode(), file=sys.stderr)
        return 1
    nv.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nv.nvrtcGetPTX(prog, ptx)
    print("compiled for", args.arch, "kernels:", ", ".join(sorted(set(re.findall(r"\.entry (\w+)", ptx.value.decode())))))
    if log.value.strip():
        print(log.value.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
