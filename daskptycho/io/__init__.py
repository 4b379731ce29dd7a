"""Reading and writing daskptycho stores (all I/O of the package lives here)."""

from .cxi import read_cxi, read_cxi_result, write_cxi
from .store import FORMAT_VERSION, build_dataset, checkpoint_info, open_dataset, open_result, validate_dataset, write_dataset, write_result
from .stream import StreamState, StreamWriter, open_frames, open_writer, replay, stream_state, wait_for_frames
from .tiff import write_tiff

__all__ = ["FORMAT_VERSION", "build_dataset", "checkpoint_info", "open_dataset", "open_result", "write_dataset", "write_result", "validate_dataset",
           "read_cxi", "read_cxi_result", "write_cxi", "write_tiff",
           "open_writer", "open_frames", "stream_state", "wait_for_frames", "replay", "StreamState", "StreamWriter"]
