"""A sentence-transformers source gives a sentence-transformers output: same modules, same pooling.

Tiny BERTs saved as sentence-transformers models (mean + Normalize, CLS, max + Normalize, through
sentence-transformers' own API) and the real all-MiniLM-L6-v2; both loading routes of the output
(`import hf_mlpfusion`, and `trust_remote_code=True` in a process where hf_mlpfusion cannot be imported).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hf_mlpfusion  # noqa: F401  (registers the fused types: route 1)
import tiny
from blocked import blocked
from hf_mlpfusion import FusionConfig
from hf_mlpfusion import sentence_transformers_files as stf
from hf_mlpfusion.calibrate import batches, prepare_tokenizer
from hf_mlpfusion.compress import compress, default_model_path
from hf_mlpfusion.data import load_texts
from hf_mlpfusion.evaluate import _hidden_and_pooled, evaluate, load_any
from test_evaluate import tiny_tokenizer

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import modules as models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = load_texts(None, split="heldout", limit=12) + ["a", "the value of the object is returned"]
# pooling mode -> is a Normalize module appended
SOURCES = {"mean": True, "cls": False, "max": True}
NORMALIZED = {**SOURCES, "minilm": True}  # + the real all-MiniLM-L6-v2 (mean, Normalize; the old file formats)


def module_list(model) -> list:
    """What a SentenceTransformer is made of: each module's class and its saved configuration."""
    return [[f"{type(m).__module__}.{type(m).__qualname__}", m.get_config_dict()] for m in model]


def make_st_model(folder: Path, mode: str, normalize: bool, tok_dir: Path, seed: int = 0) -> Path:
    """A tiny random BERT saved as a sentence-transformers model with `mode` pooling."""
    bert_dir = folder.parent / f"{folder.name}-bert"
    tiny.model("bert", seed=seed).save_pretrained(bert_dir)
    for f in tok_dir.iterdir():
        shutil.copyfile(f, bert_dir / f.name)
    transformer = models.Transformer(str(bert_dir))
    modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), pooling_mode=mode)]
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(folder), create_model_card=False)
    shutil.rmtree(bert_dir)
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tok = tiny_tokenizer(folder)
    tok.model_max_length = tiny.config("bert").max_position_embeddings
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tok_dir):
    """mode (or "minilm") -> (source folder, ratio-1.0 output folder)."""
    root = tmp_path_factory.mktemp("st")
    out = {}
    for mode, normalize in SOURCES.items():
        src = make_st_model(root / f"src-{mode}", mode, normalize, tok_dir)
        out[mode] = (src, compress(str(src), FusionConfig(ratio=1.0), root / f"out-{mode}").output)
    out["minilm"] = (default_model_path(), compress(None, FusionConfig(ratio=1.0), root / "out-minilm").output)
    return out


def _encode(model, texts=TEXTS) -> torch.Tensor:
    return model.encode(texts, convert_to_tensor=True, batch_size=8)


# --- the module on its own ----------------------------------------------------------------------


def _reference(h, mask, modes, normalize):
    """sentence-transformers' own Pooling (+ Normalize) on the same token embeddings."""
    features = {"token_embeddings": h.clone(), "attention_mask": mask}
    features = models.Pooling(h.shape[-1], pooling_mode=modes)(features)
    if normalize:
        features = models.Normalize()(features)
    return features["sentence_embedding"]


@pytest.mark.parametrize("modes", [*stf.POOLING_MODES, ("cls", "mean", "max")])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_pool_is_sentence_transformers_pooling(modes, padding):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 9, 8, generator=g)
    lengths = torch.tensor([9, 5, 1, 3])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    if padding == "left":
        mask = mask.flip(1)
    modes = (modes,) if isinstance(modes, str) else modes
    for normalize in (False, True):
        ours = stf.pool(h, mask, stf.PoolingConfig(modes=modes, normalize=normalize))
        theirs = _reference(h, mask, modes if len(modes) > 1 else modes[0], normalize)
        assert ours.shape == theirs.shape == (4, 8 * len(modes))
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()
    # the modes really differ on these inputs, so the comparison above can tell them apart
    if modes == ("cls",):
        assert (stf.pool(h, mask, None) - stf.pool(h, mask, stf.PoolingConfig(modes=("cls",)))).abs().max() > 0.1


@pytest.mark.parametrize("mode", stf.POOLING_MODES)
def test_pooling_config_files_read_as_sentence_transformers_reads_them(mode, tmp_path):
    legacy = {"word_embedding_dimension": 8, **{key: m == mode for key, m in stf._LEGACY_POOLING_KEYS.items()}}
    new = {"embedding_dimension": 8, "pooling_mode": mode, "include_prompt": False}
    for name, cfg in (("legacy", legacy), ("new", new), ("none-set", {"word_embedding_dimension": 8})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = models.Pooling.load(str(tmp_path / name))
        modes, include_prompt = stf.parse_pooling(cfg)
        expected = theirs.pooling_mode if isinstance(theirs.pooling_mode, tuple) else (theirs.pooling_mode,)
        assert modes == expected and include_prompt == theirs.include_prompt, (name, modes, theirs)
    assert stf.parse_pooling({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})[0] == ("cls", "mean")


def test_pooling_config_of_a_source_and_its_output(pairs):
    for mode, normalize in SOURCES.items():
        src, out = pairs[mode]
        for folder in (src, out):
            cfg = stf.pooling_config(folder)
            assert cfg == stf.PoolingConfig(modes=(mode,), normalize=normalize, embedding_dimension=32), (folder, cfg)
    minilm = stf.pooling_config(default_model_path())
    assert minilm.modes == ("mean",) and minilm.normalize and minilm.embedding_dimension == 384


# --- the output is the same sentence-transformers model -----------------------------------------


@pytest.mark.parametrize("mode", NORMALIZED)
def test_ratio_one_output_is_the_same_sentence_transformer(pairs, mode):
    src, out = pairs[mode]
    original, fused = SentenceTransformer(str(src), device="cpu"), SentenceTransformer(str(out), device="cpu")
    assert type(fused[0].model).__name__ == "MLPFusionBertModel"  # the fused weights, not the source's
    assert module_list(fused) == module_list(original)
    assert len(module_list(fused)) == (3 if NORMALIZED[mode] else 2)
    diff = float((_encode(fused) - _encode(original)).abs().max())
    print(f"\nratio 1.0, {mode} pooling, import hf_mlpfusion: max |difference| {diff:.3g}")
    assert diff < 1e-5


@pytest.fixture(scope="module")
def remote_code_route(pairs, tmp_path_factory):
    """Both models loaded by sentence-transformers in a process where hf_mlpfusion cannot be imported."""
    script = blocked() + """
import json
import torch
torch.set_num_threads(1)
from sentence_transformers import SentenceTransformer
pairs, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def modules(model):
    return [[f"{type(m).__module__}.{type(m).__qualname__}", m.get_config_dict()] for m in model]
result = {}
for mode, (src, out) in pairs.items():
    try:
        SentenceTransformer(out, device="cpu")
        refused = False
    except Exception:
        refused = True  # without the package and without remote code, the fused type is unknown
    a = SentenceTransformer(src, device="cpu")
    b = SentenceTransformer(out, device="cpu", trust_remote_code=True)
    ea, eb = (m.encode(texts, convert_to_tensor=True, batch_size=8) for m in (a, b))
    result[mode] = {"refused": refused, "architecture": type(b[0].model).__name__, "modules": modules(a) == modules(b),
                    "diff": float((ea - eb).abs().max()), "norm": eb.norm(dim=-1).tolist()}
print(json.dumps(result))
"""
    arg = json.dumps({m: [str(s), str(o)] for m, (s, o) in pairs.items()})
    env = {**os.environ, "HF_HOME": str(tmp_path_factory.mktemp("hf")), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, arg, json.dumps(TEXTS)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", NORMALIZED)
def test_ratio_one_output_loads_with_remote_code_without_the_package(remote_code_route, mode):
    r = remote_code_route[mode]
    print(f"\nratio 1.0, {mode} pooling, trust_remote_code: max |difference| {r['diff']:.3g}")
    assert r["refused"] and r["architecture"] == "MLPFusionBertModel"
    assert r["modules"] and r["diff"] < 1e-5
    if NORMALIZED[mode]:
        assert max(abs(n - 1) for n in r["norm"]) < 1e-5


def test_transformer_in_a_sub_folder(tok_dir, tmp_path):
    """Older sentence-transformers saved the transformer in 0_Transformer/: compress that folder and
    the output is a whole sentence-transformers model, with the fused transformer in its root."""
    src = make_st_model(tmp_path / "src", "cls", True, tok_dir)
    sub = src / "0_Transformer"
    sub.mkdir()
    for f in list(src.iterdir()):
        if f.is_file() and f.name not in ("modules.json", "config_sentence_transformers.json", "README.md"):
            f.rename(sub / f.name)
    listed = json.loads((src / "modules.json").read_text())
    listed[0]["path"] = "0_Transformer"
    (src / "modules.json").write_text(json.dumps(listed, indent=2))
    original = SentenceTransformer(str(src), device="cpu")
    with pytest.raises(stf.NotAdaptableError, match="0_Transformer"):
        stf.find_source(src)  # the root is not the checkpoint: its transformer is below

    out = compress(str(sub), FusionConfig(ratio=1.0), tmp_path / "out").output
    assert json.loads((out / "modules.json").read_text())[0]["path"] == ""
    assert [m["path"] for m in json.loads((out / "modules.json").read_text())[1:]] == ["1_Pooling", "2_Normalize"]
    assert (out / "sentence_bert_config.json").read_bytes() == (sub / "sentence_bert_config.json").read_bytes()
    assert not (out / "0_Transformer").exists()
    fused = SentenceTransformer(str(out), device="cpu")
    assert module_list(fused) == module_list(original)
    assert float((_encode(fused) - _encode(original)).abs().max()) < 1e-5


def test_same_source_in_another_folder_gives_the_same_bytes(pairs, tmp_path, monkeypatch):
    src = pairs["cls"][0]
    for where in ("a", "b/deeper"):
        shutil.copytree(src, tmp_path / where / "src")
        monkeypatch.chdir(tmp_path / where)
        compress("src", FusionConfig(ratio=0.5, seed=3), "out")
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "deeper" / "out"
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
            "1_Pooling/config.json"} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in ("modules.json", "config_sentence_transformers.json", "1_Pooling/config.json"):
        assert (a / name).read_bytes() == (src / name).read_bytes(), name  # kept as the source has them
        assert str(tmp_path) not in (a / name).read_text()


# --- evaluate and the card ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cls", "max"])
def test_evaluate_pools_as_the_model_does(pairs, tok_dir, tmp_path, mode):
    """evaluate's embedding cosine is the cosine of the two models' SentenceTransformer embeddings.

    Compared with another random BERT of the same pooling (ratio 0.25 barely moves a tiny random BERT's
    embeddings: cosine 0.9999, too close to 1 to tell poolings apart), and with the ratio-0.25 output."""
    from transformers import AutoTokenizer

    src = pairs[mode][0]
    other = make_st_model(tmp_path / "other", mode, SOURCES[mode], tok_dir, seed=1)
    small = compress(str(src), FusionConfig(ratio=0.25), tmp_path / "small").output
    embeddings = {f: torch.nn.functional.normalize(_encode(SentenceTransformer(str(f), device="cpu")), dim=-1)
                  for f in (src, other, small)}
    for b in (other, small):
        report = evaluate(src, b, TEXTS, ntk_examples=0, latency_repeats=0)
        cos = (embeddings[src] * embeddings[b]).sum(-1)
        assert report.cosine_mean == pytest.approx(float(cos.mean()), abs=1e-6)
        assert report.cosine_min == pytest.approx(float(cos.min()), abs=1e-6)
        assert report.cosine_mean < 1 - 1e-6
    # mean pooling, what evaluate did before for every model, gives another number
    encoded = list(batches(TEXTS, AutoTokenizer.from_pretrained(str(src)), max_length=64, batch_size=16))
    mean_cos = (_hidden_and_pooled(load_any(src), encoded)[1] * _hidden_and_pooled(load_any(other), encoded)[1]).sum(-1)
    report = evaluate(src, other, TEXTS, ntk_examples=0, latency_repeats=0)
    print(f"\n{mode}: evaluate cosine to another BERT {report.cosine_mean:.4f}; mean-pooled {float(mean_cos.mean()):.4f}")
    assert abs(float(mean_cos.mean()) - report.cosine_mean) > 1e-2


def test_minilm_data_free_quarter_is_unit_norm_and_pools_like_evaluate(tmp_path):
    out = compress(None, FusionConfig(ratio=0.25), tmp_path / "mini").output
    model = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    emb = _encode(model)
    assert float((emb.norm(dim=-1) - 1).abs().max()) < 1e-5
    from transformers import AutoTokenizer

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(out)))
    fused = load_any(out)
    encoded = list(batches(TEXTS, tokenizer, max_length=256, batch_size=16, model=fused))
    _, pooled = _hidden_and_pooled(fused, encoded, stf.pooling_for(out))
    assert float((pooled - emb).abs().max()) < 1e-5
    original = _encode(SentenceTransformer(str(default_model_path()), device="cpu"))
    assert float((original - emb).abs().max()) > 1e-3  # 0.25 is not the original


def test_card_of_a_sentence_transformers_output(pairs):
    text = (pairs["mean"][1] / "README.md").read_text()
    head = text.split("---")[1]
    assert "library_name: sentence-transformers" in head and "pipeline_tag: sentence-similarity" in head
    assert "from sentence_transformers import SentenceTransformer" in text and "<!-- sentence-transformers" not in text
    assert "/sentence-transformers -->" not in text  # the template's block markers are gone (the card's own marker stays)
    assert 'SentenceTransformer("your-namespace/' in text
    # the snippet runs, on the output folder in place of the Hub id
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "SentenceTransformer" in b]
    assert len(blocks) == 1
    code = re.sub(r'SentenceTransformer\("[^"]+"\)', f"SentenceTransformer({str(pairs['mean'][1])!r})", blocks[0])
    scope = {}
    exec(code, scope)
    assert scope["embeddings"].shape == (2, 32)


def test_a_plain_source_stays_plain(tmp_path):
    tiny.model("bert").save_pretrained(tmp_path / "src")
    out = compress(str(tmp_path / "src"), FusionConfig(ratio=0.5), tmp_path / "out").output
    assert not any((out / name).exists() for name in ("modules.json", "1_Pooling", "sentence_bert_config.json"))
    text = (out / "README.md").read_text()
    assert "library_name: transformers" in text and "SentenceTransformer" not in text
    assert "<!-- sentence-transformers" not in text and "/sentence-transformers -->" not in text
    assert stf.pooling_for(tmp_path / "src", out) is None


def test_modules_that_cannot_be_adapted_give_a_plain_output_and_a_warning(pairs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(pairs["mean"][0], src)
    listed = json.loads((src / "modules.json").read_text())
    listed.append({"idx": 3, "name": "3", "path": "3_Router", "type": "sentence_transformers.models.Router"})
    (src / "modules.json").write_text(json.dumps(listed))
    with pytest.warns(UserWarning, match="Router"):
        out = compress(str(src), FusionConfig(ratio=0.5), tmp_path / "out").output
    assert not (out / "modules.json").exists() and (out / "model.safetensors").is_file()
    listed[3] = {"idx": 3, "name": "3", "path": "../elsewhere", "type": "sentence_transformers.models.Dense"}
    (src / "modules.json").write_text(json.dumps(listed))
    with pytest.raises(stf.NotAdaptableError, match="relative path"):
        stf.find_source(src)


def test_compress_and_evaluate_need_no_sentence_transformers(pairs, tmp_path):
    """sentence-transformers is optional: with it blocked, the files are still written and evaluate
    still pools as the model does (the numbers match those computed with it)."""
    src = pairs["cls"][0]
    script = blocked("sentence_transformers") + f"""
import json
import torch
torch.set_num_threads(1)
from hf_mlpfusion import FusionConfig
from hf_mlpfusion.compress import compress
from hf_mlpfusion.evaluate import evaluate
out = compress({str(src)!r}, FusionConfig(ratio=0.25), {str(tmp_path / 'out')!r}).output
r = evaluate({str(src)!r}, out, json.loads(sys.argv[1]), ntk_examples=0, latency_repeats=0)
print(json.dumps({{"cosine": r.cosine_mean, "st": "sentence_transformers" in sys.modules}}))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(TEXTS)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    out = tmp_path / "out"
    assert not r["st"] and (out / "modules.json").read_bytes() == (src / "modules.json").read_bytes()
    assert (out / "1_Pooling" / "config.json").read_bytes() == (src / "1_Pooling" / "config.json").read_bytes()
    a, b = (torch.nn.functional.normalize(_encode(SentenceTransformer(str(f), device="cpu")), dim=-1) for f in (src, out))
    assert r["cosine"] == pytest.approx(float((a * b).sum(-1).mean()), abs=1e-6)
