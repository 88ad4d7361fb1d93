"""hf-mlpfusion: make Hugging Face transformer checkpoints smaller by NTK-approximating MLP fusion.

    from hf_mlpfusion import fuse, FusionConfig
    fused = fuse(model, FusionConfig(ratio=0.25, layers=range(4, 12), seed=0))
    fused.save_pretrained("out")   # then: AutoModel.from_pretrained("out")

Importing the package registers the fused model types with the transformers Auto classes.
"""

__version__ = "0.1.0"

from . import modeling as _modeling  # noqa: E402

_modeling.register()

from .config import FusionConfig, parse_layers  # noqa: E402
from .errors import MLPFusionError  # noqa: E402
from .fuse import fuse  # noqa: E402


def __getattr__(name):
    # Lazy: the file pipeline pulls in more (hub, tokenizer files) than `fuse` needs.
    if name in ("compress", "CompressResult"):
        from . import compress as _compress

        return getattr(_compress, name)
    raise AttributeError(name)


__all__ = ["FusionConfig", "MLPFusionError", "fuse", "parse_layers", "compress", "__version__"]
