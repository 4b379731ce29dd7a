"""``python -m benchmarks NAME [options]``: run one benchmark, write benchmarks/results/NAME.json."""

import importlib
import sys

NAMES = ("seams", "memory", "flyscan_modes", "dm_memory", "dm_traffic", "fft_floor", "engines", "scaling", "report", "gpu", "halos", "many_tiles", "default_run", "wave_memory", "follow", "positions", "dm_drift", "independent", "defaults", "peer_messages", "stage_timeline", "cluster_settings")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        print(f"usage: python -m benchmarks {{{'|'.join(NAMES)}}} [options]", file=sys.stderr)
        sys.exit(2)
    importlib.import_module(f"benchmarks.{sys.argv[1]}").main(sys.argv[2:])
