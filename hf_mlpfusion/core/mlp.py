"""One MLP site as tensors, of any kind, batched over layers of one shape.

A transformer MLP with p intermediate neurons is a sum of p one-neuron sub-MLPs. Every kind this
package handles is "input projections -> hidden -> output projection":

- linear pair (BERT, RoBERTa, DistilBERT; GPT-2's Conv1D pair once transposed):
  hidden = act(W1 x + b1), f(x) = W2 hidden + b2;
- gated triple (Llama, Mistral, Qwen): hidden = act(W_gate x) * (W_up x), f(x) = W_down hidden.

`MLPTensors` holds the neuron-indexed parts in one canonical (nn.Linear) orientation: each input
projection is [B, p, d] (a row per neuron) with an optional bias [B, p], the output projection is
[B, d, p] (a column per neuron). The sub-MLP vector of neuron i is the concatenation of its rows of
every input projection, its input biases, and its output column:

    linear: z_i = [W1[i, :], b1[i], W2[:, i]]              (length 2d + 1)
    gated:  z_i = [W_gate[i, :], W_up[i, :], W_down[:, i]]  (length 3d)

The output bias b2 belongs to no neuron; it is never clustered and stays as it is.
A mixture-of-experts MLP (transformers 5 stores experts as 3-D parameters) would be one more kind
here: a leading expert axis folded into B. It is not built yet.

Pure tensors: this module never imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

LINEAR, GATED = "linear", "gated"
KINDS = (LINEAR, GATED)


@dataclass
class MLPTensors:
    """B MLPs of one shape, canonical orientation (see the module docstring)."""

    ins: tuple[torch.Tensor, ...]  # each [B, p, d]: W1, or (W_gate, W_up)
    in_biases: tuple[torch.Tensor | None, ...]  # each [B, p] or None, one per input projection
    out: torch.Tensor  # [B, d, p]
    kind: str = LINEAR

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown MLP kind {self.kind!r}: expected one of {KINDS}")
        if len(self.ins) != (2 if self.kind == GATED else 1) or len(self.in_biases) != len(self.ins):
            raise ValueError(f"a {self.kind} MLP has {2 if self.kind == GATED else 1} input projection(s)")

    @property
    def width(self) -> int:
        return self.out.shape[-1]

    @property
    def hidden_size(self) -> int:
        return self.out.shape[-2]

    @property
    def batch(self) -> int:
        return self.out.shape[0]

    def parts(self) -> list[torch.Tensor]:
        """The neuron-indexed pieces in sub-MLP-vector order, each [B, p, n_i]."""
        out = [w for w in self.ins]
        out += [b.unsqueeze(-1) for b in self.in_biases if b is not None]
        out.append(self.out.transpose(-1, -2))
        return out

    def map(self, fn) -> "MLPTensors":
        """The same MLPs with `fn` applied to every tensor (dtype/device moves)."""
        return replace(self, ins=tuple(fn(w) for w in self.ins),
                       in_biases=tuple(None if b is None else fn(b) for b in self.in_biases), out=fn(self.out))

    def template(self) -> "MLPTensors":
        """The same MLPs' shapes, kind and biases on the meta device, holding no memory (what
        `split_vectors` reads of its `like`)."""
        return self.map(lambda t: torch.empty_like(t, device="meta"))

    def select(self, index: torch.Tensor) -> "MLPTensors":
        """Keep the neurons `index` [B, k] (in that order) of every MLP."""
        d = self.hidden_size
        ins = tuple(torch.gather(w, 1, index.unsqueeze(-1).expand(-1, -1, w.shape[-1])) for w in self.ins)
        biases = tuple(None if b is None else torch.gather(b, 1, index) for b in self.in_biases)
        out = torch.gather(self.out, 2, index.unsqueeze(1).expand(-1, d, -1))
        return replace(self, ins=ins, in_biases=biases, out=out)

    def neuron_norms(self) -> list[torch.Tensor]:
        """||row i|| of every input projection and ||column i|| of the output projection, each [B, p]."""
        return [w.float().norm(dim=-1) for w in self.ins] + [self.out.float().norm(dim=-2)]


def stack(mlps: list[MLPTensors]) -> MLPTensors:
    """B single MLPs ([1, ...] each) -> one batch; all of one kind and shape."""
    first = mlps[0]
    return MLPTensors(
        tuple(torch.cat([m.ins[j] for m in mlps]) for j in range(len(first.ins))),
        tuple(None if first.in_biases[j] is None else torch.cat([m.in_biases[j] for m in mlps])
              for j in range(len(first.ins))),
        torch.cat([m.out for m in mlps]),
        first.kind,
    )


def unstack(mlps: MLPTensors) -> list[MLPTensors]:
    return [mlps.map(lambda t, j=j: t[j : j + 1]) for j in range(mlps.batch)]


def sub_mlp_vectors(mlps: MLPTensors, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, p, D]: one sub-MLP vector per neuron (see the module docstring).

    With `dtype`, the vectors are cast part by part into one tensor of that dtype: the same values
    as casting the parts first and concatenating, without a cast copy of every part."""
    parts = mlps.parts()
    if dtype is None:
        return torch.cat(parts, dim=-1)
    out = torch.empty(*parts[0].shape[:-1], sum(t.shape[-1] for t in parts), dtype=dtype, device=parts[0].device)
    at = 0
    for t in parts:
        out[..., at : at + t.shape[-1]].copy_(t)
        at += t.shape[-1]
    return out


def split_vectors(z: torch.Tensor, like: MLPTensors) -> MLPTensors:
    """Inverse of `sub_mlp_vectors`: [B, k, D] -> MLPs of width k with `like`'s kind and biases."""
    d = like.hidden_size
    at = 0
    ins = []
    for _ in like.ins:
        ins.append(z[..., at : at + d])
        at += d
    biases = []
    for b in like.in_biases:
        if b is None:
            biases.append(None)
        else:
            biases.append(z[..., at])
            at += 1
    out = z[..., at : at + d].transpose(-1, -2)
    if at + d != z.shape[-1]:
        raise ValueError(f"vectors of length {z.shape[-1]} do not split into this MLP's parts")
    return MLPTensors(tuple(ins), tuple(biases), out, like.kind)


def cluster_sizes(labels: torch.Tensor, k: int) -> torch.Tensor:
    """[B, p] int labels -> [B, k] float64 cluster sizes."""
    counts = torch.zeros(labels.shape[0], k, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float64))
    return counts


def scale_output(mlps: MLPTensors, scale: torch.Tensor) -> MLPTensors:
    """Multiply each neuron's output column by scale [B, p] (folding a count vector is this)."""
    return replace(mlps, out=mlps.out * scale.unsqueeze(-2).to(mlps.out.dtype))


def hidden(kind: str, act, pre: list[torch.Tensor]) -> torch.Tensor:
    """The MLP's hidden features from the pre-activations of its input projections."""
    if kind == GATED:
        return act(pre[0]) * pre[1]
    return act(pre[0])


def forward(mlps: MLPTensors, act, x: torch.Tensor, counts: torch.Tensor | None = None,
            out_bias: torch.Tensor | None = None) -> torch.Tensor:
    """f(x) of MLP 0 of the batch on x [N, d] (reference implementation, for tests and checks)."""
    pre = [x @ w[0].T + (0 if b is None else b[0]) for w, b in zip(mlps.ins, mlps.in_biases)]
    h = hidden(mlps.kind, act, pre)
    if counts is not None:
        h = h * counts
    y = h @ mlps.out[0].T
    return y if out_bias is None else y + out_bias
