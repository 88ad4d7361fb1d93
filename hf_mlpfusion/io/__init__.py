"""Reading and writing checkpoints a tensor at a time, and the streaming compress built on it.

    safetensors_format  the safetensors layout, so a file's header can be written before its tensors exist
    writer              ShardedWriter: weights shard by shard, tensor by tensor, in transformers' layout
    save                write_pretrained (save_pretrained's files, weights through the writer)
    reader              SafetensorsSource (a tensor at a time) and LazyModel (a meta-device model whose
                        blocks load from the files on demand: load_block(i) / release_block(i))
    stream              the streaming compress: plan on the meta device, copy, fuse a group at a time, finish
    layerwise           the calibrated compress a block at a time: trace, (measure,) fuse + calibrate + write
    distributed         sharing the layer groups among processes (torchrun / accelerate launch)

Both compress paths write through `ShardedWriter`, so they give the same bytes.
"""

from .distributed import Workers, is_main_process
from .reader import LazyModel, SafetensorsSource
from .save import NotStreamable, weight_specs, write_model_files, write_pretrained
from .writer import DEFAULT_MAX_SHARD_SIZE, ShardedWriter, parse_shard_size, write_tensors

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "LazyModel", "NotStreamable", "SafetensorsSource", "ShardedWriter", "Workers",
           "is_main_process", "parse_shard_size", "weight_specs", "write_model_files", "write_pretrained",
           "write_tensors"]
