"""`FusionConfig`: what to fuse, how much, and how (the one object the library entry point takes)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from .errors import InvalidConfigError

DEFAULT_RATIO = 0.25  # the paper's setting (3072 -> 768)
DEFAULT_CALIBRATION_SAMPLES = 1024  # calibration samples read when --calibration-samples is not given


MAX_LAYER_INDEX = 99_999  # beyond any model's depth: a larger index is a typo, refused before it is expanded


def layer_ranges(indices) -> str:
    """Sorted layer indices written short: [0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def parse_layers(spec: str | Sequence[int] | range | None) -> list[int] | None:
    """'4-11', '0,2,5', '0-3,8' or a sequence of ints -> sorted unique list; None means all layers."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.replace(" ", "")
        if text.lower() == "all":
            return None
        if not text:
            raise InvalidConfigError(
                "the layer list is empty: name layers such as '4-11' or '0,2,5', or leave the option out to fuse all"
            )
        out: set[int] = set()
        for part in text.split(","):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise InvalidConfigError(
                    f"bad layer list {spec!r}: use indices and ranges such as '4-11' or '0,2,5' (0-based)"
                )
            lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
            if hi < lo:
                raise InvalidConfigError(f"bad layer range {part!r} in {spec!r}: write it low-high, e.g. '4-11'")
            if hi > MAX_LAYER_INDEX:
                raise InvalidConfigError(f"layer {hi} in {spec!r} is beyond any model's depth: layers are numbered "
                                         "from 0 to the model's number of layers - 1")
            out.update(range(lo, hi + 1))
        return sorted(out)
    if isinstance(spec, range) and spec and max(spec[0], spec[-1]) > MAX_LAYER_INDEX:
        raise InvalidConfigError(f"layers {spec} reach beyond any model's depth: name the model's layers (0-based)")
    try:
        values = [int(i) for i in spec]
    except (TypeError, ValueError):
        raise InvalidConfigError(f"bad layer list {spec!r}: give layer indices as integers") from None
    if any(i < 0 for i in values):
        raise InvalidConfigError(f"bad layer list {list(spec)}: layer indices are 0-based and non-negative")
    return sorted(set(values))


def round_width(k: int, width: int, multiple: int) -> int:
    """k rounded to the nearest multiple of `multiple` (at least one multiple, at most `width`)."""
    if multiple <= 1:
        return k
    return min(width, max(multiple, int(math.floor(k / multiple + 0.5)) * multiple))


@dataclass
class FusionConfig:
    """Settings of one fusion run.

    Give `ratio` (kept fraction of each fused MLP's width, in (0, 1]) or an absolute
    `intermediate_size`, not both; with neither, ratio 0.25 (the paper's setting) is used.
    `layers` selects the layers to fuse (None = all). `n_init`, `max_iter`, `tol` go to the k-means
    (None = its documented defaults). `device="auto"` clusters on CUDA when available.
    `fold_scale=True` folds the frozen count vector into W2 (exact for inference; the paper keeps it
    separate so the fused MLP's NTK matches the original's during fine-tuning).
    `widths` (layer -> width) sets some layers' widths directly, e.g. from `allocate` (the ratio then
    stays the budget it was chosen under); `width_multiple` rounds every fused width to a multiple
    (8 or 64 run fastest on most hardware).
    """

    ratio: float | None = None
    intermediate_size: int | None = None
    layers: Sequence[int] | str | None = None
    seed: int = 0
    method: str = "fusion"
    n_init: int | None = None
    max_iter: int | None = None
    tol: float | None = None
    device: str = "auto"
    fold_scale: bool = False
    widths: dict | None = None
    width_multiple: int = 1
    extra: dict = field(default_factory=dict)  # method-specific options (e.g. calibration settings)

    def __post_init__(self):
        if self.ratio is not None and self.intermediate_size is not None:
            raise InvalidConfigError("give either a ratio or an intermediate size, not both")
        if self.ratio is None and self.intermediate_size is None:
            self.ratio = DEFAULT_RATIO
        if self.ratio is not None:
            try:
                self.ratio = float(self.ratio)
            except (TypeError, ValueError):
                raise InvalidConfigError(f"bad ratio {self.ratio!r}: use a number in (0, 1], e.g. 0.25") from None
            if not (0.0 < self.ratio <= 1.0) or math.isnan(self.ratio):
                raise InvalidConfigError(f"ratio {self.ratio} is outside (0, 1]: use e.g. 0.25 to keep a quarter")
        if self.intermediate_size is not None:
            if isinstance(self.intermediate_size, bool) or int(self.intermediate_size) != self.intermediate_size:
                raise InvalidConfigError(f"bad intermediate size {self.intermediate_size!r}: use a whole number")
            self.intermediate_size = int(self.intermediate_size)
            if self.intermediate_size < 1:
                raise InvalidConfigError(
                    f"intermediate size {self.intermediate_size} leaves no neuron: use at least 1"
                )
        self.layers = parse_layers(self.layers)
        from .methods import METHODS as known  # the methods package owns the list of methods

        if self.method not in known:
            raise InvalidConfigError(f"unknown method {self.method!r}: choose one of {', '.join(known)}")
        if self.fold_scale and not known[self.method].counts:
            with_counts = " and ".join(name for name, m in known.items() if m.counts)
            raise InvalidConfigError(f"fold_scale (--fold-scale) folds the count vector into the weights, and method "
                                     f"{self.method!r} has none (only {with_counts} does): its output needs no "
                                     "folding, drop --fold-scale")
        if self.n_init is not None and self.n_init < 1:
            raise InvalidConfigError("n_init must be at least 1")
        if self.max_iter is not None and self.max_iter < 0:
            raise InvalidConfigError("max_iter must be non-negative")
        if isinstance(self.width_multiple, bool) or not isinstance(self.width_multiple, int) or self.width_multiple < 1:
            raise InvalidConfigError(f"bad width multiple {self.width_multiple!r}: use a whole number of at least 1 (8 or 64 are usual)")
        if self.widths is not None:
            try:
                self.widths = {int(i): int(w) for i, w in dict(self.widths).items()}
            except (TypeError, ValueError):
                raise InvalidConfigError("widths must map layer indices to whole numbers") from None
            bad = {i: w for i, w in self.widths.items() if i < 0 or w < 1}
            if bad:
                raise InvalidConfigError(f"bad per-layer widths {bad}: layers are 0-based and widths at least 1")

    def width_for(self, width: int, layer: int | None = None) -> int:
        """The fused width of an MLP that has `width` neurons (layer `layer`)."""
        if self.widths is not None and layer in self.widths:
            k = self.widths[layer]
            if k > width:
                raise InvalidConfigError(f"width {k} for layer {layer} is larger than its {width} neurons")
            return k
        k = self._width_for(width)
        if self.width_multiple > k:  # rounding up to one multiple would fuse far less than asked, or nothing
            asked = f"--intermediate-size {k}" if self.intermediate_size is not None else f"ratio {self.ratio:g}"
            raise InvalidConfigError(
                f"width multiple {self.width_multiple} is larger than the fused width {k} that {asked} gives "
                f"({width} neurons): use a multiple of at most {k}, or a larger width")
        return round_width(k, width, self.width_multiple)

    def _width_for(self, width: int) -> int:
        if self.intermediate_size is not None:
            k = self.intermediate_size
            if k > width:
                raise InvalidConfigError(
                    f"intermediate size {k} is larger than the MLP's {width} neurons: use at most {width}"
                )
            return k
        k = int(math.floor(self.ratio * width + 0.5))
        if k < 1:
            raise InvalidConfigError(
                f"ratio {self.ratio} leaves no neuron of {width}: use a ratio of at least {1 / width:.2g}"
            )
        return min(k, width)

    def resolve_layers(self, num_layers: int) -> list[int]:
        if self.widths is not None:
            bad = sorted(i for i in self.widths if i >= num_layers or (self.layers is not None and i not in self.layers))
            if bad:
                raise InvalidConfigError(f"widths given for layer(s) {bad}, which are not fused (or not in the model)")
        if self.layers is None:
            return list(range(num_layers))
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise InvalidConfigError(
                f"layer(s) {layer_ranges(bad)} out of range: this model has {num_layers} layers (0-{num_layers - 1})"
            )
        if not self.layers:
            raise InvalidConfigError("the layer list is empty: name at least one layer")
        return list(self.layers)

    def kmeans_options(self) -> dict:
        return {"n_init": self.n_init, "max_iter": self.max_iter, "tol": self.tol}
