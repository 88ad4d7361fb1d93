"""Fidelity of a fused model to its original: what the compression cost, in numbers.

`evaluate(original, fused, texts, tokenizer)` (models in memory or checkpoint folders) measures on
the same texts:

- relative error of the last hidden states, ||H' - H||_F / ||H||_F over the non-padding tokens;
- for encoders (BERT, RoBERTa): cosine of mean-pooled, normalised embeddings (mean and minimum),
  pooled as the model's own Pooling module does when it is a sentence-transformers model;
- perplexity before/after (causal LMs: GPT-2, and BERT/RoBERTa causal-LM heads) and masked-LM loss
  before/after (masked-LM heads; 15% of tokens masked, seeded, the same for both models);
- the paper's Adam-NTK error per fused layer: per-example gradients G of a scalar output (the
  pooled last hidden state projected on a fixed random unit vector) with respect to the layer's MLP
  parameters (counts excluded: they are frozen); K = G sign(G)^T; error ||K' - K||_F / ||K||_F;
- parameters before/after and the CPU latency ratio (median of repeated forward passes).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .calibrate import batches, fused_layers, max_tokens, prepare_tokenizer
from .errors import InvalidConfigError, ModelNotFoundError
from .families import family_of, stock_type
from .fuse import count_parameters
from .modeling.modeling_mlpfusion import stock_heads

MASK_FRACTION = 0.15


@dataclass
class EvaluationReport:
    original: str
    fused: str
    samples: int
    tokens: int
    hidden_relative_error: float
    cosine_mean: float | None = None
    cosine_min: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    mlm_loss_before: float | None = None
    mlm_loss_after: float | None = None
    ntk_examples: int = 0
    ntk_error: dict[int, float] = field(default_factory=dict)  # fused layer -> relative Adam-NTK error
    parameters_before: int = 0
    parameters_after: int = 0
    latency_before_ms: float | None = None
    latency_after_ms: float | None = None

    @property
    def parameter_ratio(self) -> float:
        return self.parameters_after / self.parameters_before if self.parameters_before else float("nan")

    @property
    def latency_ratio(self) -> float | None:
        if not self.latency_before_ms or self.latency_after_ms is None:
            return None
        return self.latency_after_ms / self.latency_before_ms

    @property
    def ntk_error_mean(self) -> float | None:
        return statistics.fmean(self.ntk_error.values()) if self.ntk_error else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ntk_error"] = {str(k): v for k, v in self.ntk_error.items()}
        d["ntk_error_mean"] = self.ntk_error_mean
        d["parameter_ratio"] = self.parameter_ratio
        d["latency_ratio"] = self.latency_ratio
        return _finite(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


def _finite(x):
    """JSON has no NaN/inf: they become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --- loading ------------------------------------------------------------------------------------


def load_any(folder: str | Path):
    """Load a stock or fused checkpoint folder with its own head class (fused types need no remote code)."""
    from .compress import load_model

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"no such folder: {folder}")
    return load_model(folder, fused_ok=True)[0]


def original_of(fused_folder: str | Path, name: str | None = None) -> tuple[str, str]:
    """(its name, where to load it) for the model a fused checkpoint folder says it was made from:
    its Hub id (config.json's `mlpfusion.base_model`), loaded from the Hub, or from the installed
    built-in MiniLM when it is that one. A checkpoint made from a local folder cannot name it: that
    is an error saying to give it."""
    from .sources import DEFAULT_MODEL_ID, default_model_path, recorded_base_model

    name = name or str(fused_folder)
    try:
        meta = json.loads((Path(fused_folder) / "config.json").read_text(encoding="utf-8")).get("mlpfusion")
    except (OSError, ValueError, AttributeError):
        meta = None
    if not isinstance(meta, dict):
        raise InvalidConfigError(f"{name} is not an MLP-fused checkpoint, so it names no original: give both, "
                                 f"`mlpfusion evaluate ORIGINAL FUSED`")
    base = recorded_base_model(meta)
    if base is None:
        source = meta.get("source_model") or "a local folder"
        raise InvalidConfigError(f"{name} was made from a local folder or file ({source}), which its config cannot point to: "
                                 f"give it, `mlpfusion evaluate ORIGINAL {name}`")
    if base == DEFAULT_MODEL_ID:
        try:
            return base, str(default_model_path())  # the built-in default: the same model, installed, no download
        except ModelNotFoundError:
            pass
    return base, base


def load_tokenizer(*folders):
    """The tokenizer of the first folder that has tokenizer files (local files only: never the Hub)."""
    from transformers import AutoTokenizer

    from .calibrate import has_tokenizer_files
    from .compress import quiet_transformers

    tried = [f for f in folders if f is not None]
    for folder in tried:
        if not has_tokenizer_files(folder):
            continue
        try:
            with quiet_transformers():
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception:
            continue
    raise InvalidConfigError(
        f"no usable tokenizer files (tokenizer.json, vocab.txt, ...) in {' or '.join(map(str, tried)) or 'either model'}: "
        "copy the tokenizer files of the original model into one of the folders"
    )


def check_comparable(original_config, fused_config) -> None:
    """The two models can be compared token by token: one family, hidden size, depth and vocabulary."""
    fo, ff = family_of(original_config), family_of(fused_config)
    if fo.name != ff.name:
        raise InvalidConfigError(f"the two models are of different families ({fo.name} and {ff.name}): compare a "
                                 "fused model with the model it was fused from")
    facts = [("hidden size", fo.hidden_size(original_config), ff.hidden_size(fused_config)),
             ("number of layers", fo.num_layers(original_config), ff.num_layers(fused_config)),
             ("vocabulary size", getattr(original_config, "vocab_size", None), getattr(fused_config, "vocab_size", None))]
    for what, a, b in facts:
        if a != b:
            raise InvalidConfigError(
                f"the two models differ in {what} ({a} and {b}): compare a fused model with the model it was fused from"
            )


# --- metrics ------------------------------------------------------------------------------------


def _is_encoder(model) -> bool:
    return not family_of(model).decoder


def _head_kind(model) -> str | None:
    """How to get language-model logits from this head: "causal", "masked", "causal-tied" (a decoder's
    base model whose input embedding is tied to its output), or None (no language-model head)."""
    family = family_of(model)
    name = type(model).__name__
    if getattr(type(model), "stock_class", None) is not None:
        name = type(model).stock_class.__name__
    heads = stock_heads(stock_type(model.config.model_type))
    if name == heads.get("AutoModelForCausalLM") or (family.decoder and name in family.extra_heads):
        return "causal"
    if not family.decoder and name in (heads.get("AutoModelForMaskedLM"), heads.get("AutoModelForPreTraining")):
        return "masked"
    if family.decoder and name == heads.get("AutoModel") and getattr(model.config, "tie_word_embeddings", True):
        return "causal-tied"  # a decoder body without its head: logits through the tied input embedding
    return None


def _logits(model, kind: str, batch: dict) -> torch.Tensor:
    if kind == "causal-tied":
        h = model.base_model(**batch).last_hidden_state
        return h @ model.base_model.get_input_embeddings().weight.T
    out = model(**batch)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.prediction_logits


def _mask_batch(batch: dict, tokenizer, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    ids = batch["input_ids"].clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for tid in getattr(tokenizer, "all_special_ids", []) or []:
        if tid != tokenizer.unk_token_id:  # unknown words are text: they may be masked
            special |= ids == tid
    candidates = batch["attention_mask"].bool() & ~special
    pick = (torch.rand(ids.shape, generator=gen) < MASK_FRACTION) & candidates
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    mask_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
    ids[pick] = mask_id
    return {**batch, "input_ids": ids}, labels


@torch.no_grad()
def _lm_loss(model, kind, encoded, masked) -> float:
    total, count = 0.0, 0
    for i, batch in enumerate(encoded):
        if kind == "masked":
            inp, labels = masked[i]
            logits = _logits(model, kind, inp)
        else:
            logits = _logits(model, kind, batch)[:, :-1]
            labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    return total / count if count else float("nan")


@torch.no_grad()
def _hidden_and_pooled(model, encoded, pooling=None):
    """`pooling`: a sentence-transformers model's PoolingConfig (its own pooling); None = mean pooling."""
    from .sentence_transformers_files import pool

    hs, pooled = [], []
    for batch in encoded:
        h = model.base_model(**batch).last_hidden_state.float()
        m = batch["attention_mask"].unsqueeze(-1).float()
        hs.append(h[batch["attention_mask"].bool()])
        e = (h * m).sum(1) / m.sum(1).clamp_min(1) if pooling is None else pool(h, batch["attention_mask"], pooling)
        pooled.append(nn.functional.normalize(e, dim=-1))
    return torch.cat(hs), torch.cat(pooled)


def _mlp_params(model, layers: list[int]) -> dict[int, list[torch.Tensor]]:
    family = family_of(model)
    blocks = family.block_list(model)
    out = {}
    for i in layers:
        ins, proj = family.projections(blocks[i])
        out[i] = [p for mod in (*ins, proj) for p in mod.parameters(recurse=False)]  # counts are buffers
    return out


def ntk_gradients(model, layers: list[int], examples: list[dict], direction: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-example gradients G [n_examples, n_params] of the scalar <direction, pooled output> with
    respect to each listed layer's MLP parameters."""
    params = _mlp_params(model, layers)
    flat = [p for i in layers for p in params[i]]
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    flags = [p.requires_grad for p in flat]
    try:
        for p in flat:
            p.requires_grad_(True)
        with torch.enable_grad():
            for ex in examples:
                h = model.base_model(**ex).last_hidden_state
                m = ex["attention_mask"].unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1)
                scalar = (pooled.float() @ direction).sum()
                grads = torch.autograd.grad(scalar, flat, allow_unused=True)
                at = 0
                for i in layers:
                    n = len(params[i])
                    g = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params[i], grads[at : at + n])]
                    rows[i].append(torch.cat([x.reshape(-1) for x in g]).double())
                    at += n
    finally:
        for p, f in zip(flat, flags):
            p.requires_grad_(f)
    return {i: torch.stack(r) for i, r in rows.items()}


def adam_ntk(G: torch.Tensor) -> torch.Tensor:
    """The sign-based (Adam) NTK of per-example gradients: K = G sign(G)^T."""
    return G @ torch.sign(G).T


def ntk_errors(original, fused, examples: list[dict], layers: list[int], *, seed: int = 0) -> dict[int, float]:
    """Relative Adam-NTK error ||K_fused - K_orig||_F / ||K_orig||_F for each fused layer."""
    d = family_of(original).hidden_size(original.config)
    direction = torch.randn(d, generator=torch.Generator().manual_seed(int(seed)))
    direction = direction / direction.norm()
    go = ntk_gradients(original, layers, examples, direction)
    gf = ntk_gradients(fused, layers, examples, direction)
    out = {}
    for i in layers:
        ko, kf = adam_ntk(go[i]), adam_ntk(gf[i])
        out[i] = float((kf - ko).norm() / ko.norm().clamp_min(1e-300))
    return out


@torch.inference_mode()
def latency_ms(model, batch: dict, repeats: int = 5) -> float:
    model.base_model(**batch)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.base_model(**batch)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@dataclass
class _Prepared:
    """Both models loaded, the tokenizer and the pooling to use (what `evaluate` needs before any text)."""

    original: object
    fused: object
    tokenizer: object
    pooling: object
    names: list
    where: str = "the models"


def _prepare(original, fused, tokenizer, say, *, samples=None, ntk_examples=0, max_length=1, batch_size=1,
             latency_repeats=0) -> _Prepared:
    """Check everything cheap first (the counts, both folders, their configs and weights headers, the
    tokenizer), then load both models."""
    from .compress import open_checkpoint

    names = [str(original) if isinstance(original, (str, Path)) else str(getattr(original.config, "_name_or_path", "") or "original"),
             str(fused) if isinstance(fused, (str, Path)) else str(getattr(fused.config, "_name_or_path", "") or "fused")]
    for name, value, low in (("samples", samples, 1), ("ntk examples", ntk_examples, 0), ("max length", max_length, 1),
                             ("batch size", batch_size, 1), ("latency repeats", latency_repeats, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise InvalidConfigError(f"{name} {value!r} must be a whole number >= {low}")
    opened = {}
    for role, x in (("original", original), ("fused", fused)):
        if isinstance(x, (str, Path)):
            if not Path(x).is_dir():
                raise ModelNotFoundError(f"no such folder: {x} (the {role} model)")
            opened[role] = open_checkpoint(Path(x), fused_ok=True)
    if len(opened) == 2:
        check_comparable(opened["original"].config, opened["fused"].config)
    if tokenizer is None:
        tokenizer = load_tokenizer(*(x for x in (fused, original) if isinstance(x, (str, Path))))
    from .sentence_transformers_files import pooling_for

    pooling = pooling_for(original, fused)  # a sentence-transformers source: its own pooling; else mean
    where = " / ".join(str(x) for x in (fused, original) if isinstance(x, (str, Path))) or "the models"
    if "original" in opened:
        say(f"loading {original}")
        original = opened["original"].load()
    if "fused" in opened:
        say(f"loading {fused}")
        fused = opened["fused"].load()
    check_comparable(original.config, fused.config)
    prepared = _Prepared(original, fused, tokenizer, pooling, names)
    prepared.where = where
    return prepared


def evaluate(original, fused, texts: list[str] | None = None, tokenizer=None, *, samples: int | None = 256,
             ntk_examples: int = 16, max_length: int = 128, batch_size: int = 16, latency_repeats: int = 5,
             seed: int = 0, progress=None) -> EvaluationReport:
    """Compare `fused` with `original` (models or checkpoint folders) on `texts` (None = the
    built-in held-out English text). `ntk_examples=0` skips the NTK, `latency_repeats=0` the timing."""
    say = progress or (lambda msg: None)
    prepared = _prepare(original, fused, tokenizer, say, samples=samples, ntk_examples=ntk_examples,
                        max_length=max_length, batch_size=batch_size, latency_repeats=latency_repeats)
    return _evaluate(prepared, texts, samples=samples, ntk_examples=ntk_examples, max_length=max_length,
                     batch_size=batch_size, latency_repeats=latency_repeats, seed=seed, say=say)


def _evaluate(prepared: _Prepared, texts, *, samples, ntk_examples, max_length, batch_size, latency_repeats, seed,
              say) -> EvaluationReport:
    from .calibrate import check_tokenizer
    from .data import load_texts

    original, fused, tokenizer, pooling, names = (prepared.original, prepared.fused, prepared.tokenizer,
                                                  prepared.pooling, prepared.names)
    texts = load_texts(None, split="heldout", limit=samples) if texts is None else list(texts)[:samples]
    if not texts:
        raise InvalidConfigError("no text to evaluate on")
    check_tokenizer(tokenizer, texts, where=prepared.where)
    tokenizer = prepare_tokenizer(tokenizer)
    was = (original.training, fused.training)
    original.eval()
    fused.eval()
    try:
        encoded = list(batches(texts, tokenizer, max_length=max_length, batch_size=batch_size,
                               model=original if max_tokens(original) < max_tokens(fused) else fused))
        say("comparing hidden states")
        ho, po = _hidden_and_pooled(original, encoded, pooling)
        hf, pf = _hidden_and_pooled(fused, encoded, pooling)
        report = EvaluationReport(
            original=names[0], fused=names[1], samples=len(texts), tokens=int(ho.shape[0]),
            hidden_relative_error=float((hf.double() - ho.double()).norm() / ho.double().norm().clamp_min(1e-300)),
            parameters_before=count_parameters(original), parameters_after=count_parameters(fused),
        )
        if _is_encoder(original):
            cos = (po * pf).sum(-1).clamp(-1, 1)
            report.cosine_mean, report.cosine_min = float(cos.mean()), float(cos.min())
        kind_o, kind_f = _head_kind(original), _head_kind(fused)
        if kind_o is not None and kind_o == kind_f:
            say("language-model loss")
            gen = torch.Generator().manual_seed(int(seed))
            masked = [_mask_batch(b, tokenizer, gen) for b in encoded] if kind_o == "masked" else None
            before, after = _lm_loss(original, kind_o, encoded, masked), _lm_loss(fused, kind_f, encoded, masked)
            if kind_o == "masked":
                report.mlm_loss_before, report.mlm_loss_after = before, after
            else:
                report.perplexity_before, report.perplexity_after = math.exp(before), math.exp(after)
        layers = fused_layers(original, fused)
        if ntk_examples and layers:
            say(f"Adam-NTK on {min(ntk_examples, len(texts))} examples")
            examples = list(batches(texts[:ntk_examples], tokenizer, max_length=max_length, batch_size=1, model=fused))
            report.ntk_examples = len(examples)
            report.ntk_error = ntk_errors(original, fused, examples, layers, seed=seed)
        if latency_repeats:
            say("timing")
            report.latency_before_ms = latency_ms(original, encoded[0], latency_repeats)
            report.latency_after_ms = latency_ms(fused, encoded[0], latency_repeats)
    finally:
        original.train(was[0])
        fused.train(was[1])
    return report


def evaluate_domains(original, fused, domains: dict[str, list[str]] | str | None = None, tokenizer=None, *,
                     samples: int | None = 256, ntk_examples: int = 16, latency_repeats: int = 5,
                     progress=None, **kwargs) -> dict[str, EvaluationReport]:
    """`evaluate` on each of several texts: {domain name: report}. `domains` is a dict of texts, a
    built-in spec (`"builtin"` = the held-out split of every source of the built-in mix,
    `"builtin:all"` = of every source, which must be installed, `"builtin:bible,tweets"` = of those), or None
    (= "builtin"). The NTK and the latency, which do not depend on the text much, are measured on
    the first domain only."""
    from .text import heldout_texts

    say = progress or (lambda msg: None)
    if domains is None or isinstance(domains, str):
        domains = heldout_texts(domains or "builtin", limit=samples)
    if not domains:
        raise InvalidConfigError("no texts to evaluate on: give at least one domain")
    prepared = _prepare(original, fused, tokenizer, say, samples=samples, ntk_examples=ntk_examples,
                        latency_repeats=latency_repeats)
    out = {}
    for j, (name, texts) in enumerate(domains.items()):
        say(f"domain {name} ({j + 1}/{len(domains)})")
        opts = {"max_length": 128, "batch_size": 16, "seed": 0, **kwargs}
        out[name] = _evaluate(prepared, texts, samples=samples, ntk_examples=ntk_examples if j == 0 else 0,
                              latency_repeats=latency_repeats if j == 0 else 0, say=say, **opts)
    return out
