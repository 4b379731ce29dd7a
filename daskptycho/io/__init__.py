"""Reading and writing daskptycho stores (all I/O of the package lives here)."""

from .store import FORMAT_VERSION, open_dataset, open_result, validate_dataset, write_dataset, write_result

__all__ = ["FORMAT_VERSION", "open_dataset", "open_result", "write_dataset", "write_result", "validate_dataset"]
