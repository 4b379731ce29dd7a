"""Reading and writing daskptycho stores (all I/O of the package lives here)."""

from .cxi import read_cxi, read_cxi_result, write_cxi
from .store import FORMAT_VERSION, build_dataset, checkpoint_info, open_dataset, open_result, validate_dataset, write_dataset, write_result
from .tiff import write_tiff

__all__ = ["FORMAT_VERSION", "build_dataset", "checkpoint_info", "open_dataset", "open_result", "write_dataset", "write_result", "validate_dataset",
           "read_cxi", "read_cxi_result", "write_cxi", "write_tiff"]
