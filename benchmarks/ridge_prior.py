"""Ridge toward the data-free solution instead of toward zero, in the calibration refit (docs/domains.md).

MiniLM, all 6 layers at 0.25, built-in mix (1024 samples), cosine on 128 held-out samples of five
sources; the default refit first, then `refit_layer(..., ridge=lam, toward_current=True)`: the
ridge pulls toward the data-free weights the fused layer starts from, (A + lam I) W = B + lam W_0.

    python benchmarks/ridge_prior.py
"""
import copy
import functools

import torch
import transformers

import hf_mlpfusion.calibrate as C
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.compress import default_model_path
from hf_mlpfusion.evaluate import evaluate
from hf_mlpfusion.text import heldout_texts, load_calibration

torch.set_num_threads(1)
path = default_model_path()
model = transformers.AutoModel.from_pretrained(path).eval()
tok = transformers.AutoTokenizer.from_pretrained(path)
cal = load_calibration("builtin", tokenizer=tok, limit=1024)
held = heldout_texts("builtin:all", limit=128)
held = {k: held[k] for k in ("pydoc", "bible", "gcide", "tweets", "licenses") if k in held}
cfg = FusionConfig(ratio=0.25, seed=0, device="cpu")
base = fuse(model, cfg, metrics=C.data_metrics(model, list(range(6)), cal, tok))
default_refit = C.refit_layer
print("| refit | " + " | ".join(held) + " |\n|---|" + "---:|" * len(held))
for lam in [None, 1e-3, 1e-2, 1e-1, 1.0]:
    fused = copy.deepcopy(base)
    C.refit_layer = default_refit if lam is None else functools.partial(default_refit, toward_current=True)
    C.calibrate(model, fused, cal, tok, ridge=C.RIDGE if lam is None else lam)
    scores = [evaluate(model, fused, t, tok, ntk_examples=0, latency_repeats=0).cosine_mean for t in held.values()]
    name = f"default (toward zero, λ {C.RIDGE:g})" if lam is None else f"toward data-free, λ {lam:g}"
    print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in scores) + " |", flush=True)
C.refit_layer = default_refit
