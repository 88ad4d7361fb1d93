"""Ridge toward the data-free solution instead of toward zero, in the calibration refit (docs/domains.md).

MiniLM, all 6 layers at 0.25, built-in mix (1024 samples), cosine on 128 held-out samples of five
sources; the default refit first, then (A + lam I) W = B + lam W_data-free for each lam.

    python benchmarks/ridge_prior.py
"""
import copy

import torch
import transformers

import hf_mlpfusion.calibrate as C
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.compress import default_model_path
from hf_mlpfusion.evaluate import evaluate
from hf_mlpfusion.text import load_calibration, heldout_texts
torch.set_num_threads(1)
p = default_model_path()
m = transformers.AutoModel.from_pretrained(p).eval(); tok = transformers.AutoTokenizer.from_pretrained(p)
cal = load_calibration("builtin", tokenizer=tok, limit=1024)
held = heldout_texts("builtin:all", limit=128)
held = {k: held[k] for k in ("pydoc", "bible", "gcide", "tweets", "licenses")}
cfg = FusionConfig(ratio=0.25, seed=0, device="cpu")
met = C.data_metrics(m, list(range(6)), cal, tok)
base = fuse(m, cfg, metrics=met)
orig_refit = C.refit_layer
def make(lam_rel):
    def refit(family, block, x, y, *, ridge=C.RIDGE, w=None, chunk=8192):
        _, out = family.projections(block)
        cur = family.read(block)
        k = cur.width
        old = torch.cat([cur.out[0].detach().double().T, out.bias.detach().double()[None]])
        A = torch.zeros(k+1, k+1, dtype=torch.float64); B = torch.zeros(k+1, y.shape[1], dtype=torch.float64)
        with torch.no_grad():
            for s in range(0, x.shape[0], chunk):
                h = C.mlp_hidden(family, block, x[s:s+chunk]).float()
                h = torch.cat([h, torch.ones(h.shape[0], 1)], 1)
                wt = w[s:s+chunk][:, None]
                A += ((h*wt).T @ h).double(); B += ((h*wt).T @ y[s:s+chunk]).double()
        lam = lam_rel * float(A.diagonal().mean())
        reg = torch.eye(k+1, dtype=torch.float64) * lam; reg[-1,-1] = 0
        W = torch.linalg.solve(A + reg, B + reg @ old)
        family.write_output(block, W[:k].T, W[k])
        e = C._sq_error(family, block, x, y, w)
        return 0.0, e, True
    return refit
for lam in [None, 1e-3, 1e-2, 1e-1, 1.0]:
    f = copy.deepcopy(base)
    C.refit_layer = orig_refit if lam is None else make(lam)
    C.calibrate(m, f, cal, tok)
    scores = {d: round(evaluate(m, f, t, tok, ntk_examples=0, latency_repeats=0).cosine_mean, 3) for d, t in held.items()}
    print("ridge-to-data-free" if lam else "ridge-to-zero 1e-6", lam, scores, flush=True)
