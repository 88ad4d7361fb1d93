"""Save -> load for every head of every model type in the registry, through both routes.

(a) `import hf_mlpfusion` then the stock Auto class; (b) `trust_remote_code=True` in a subprocess
where hf_mlpfusion cannot be imported, using only the files written next to the weights.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hf_mlpfusion  # noqa: F401  (registers the auto classes)
import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.compress import save_fused
from hf_mlpfusion.families import family_for

CASES = tiny.CASES


def _save_case(root: Path, family: str, head: str) -> tuple[Path, list[torch.Tensor]]:
    m = tiny.model(family, head)
    fused = fuse(m, FusionConfig(ratio=0.25, layers=[0, 2], seed=0))
    folder = root / head
    save_fused(fused, folder)
    return folder, tiny.outputs(fused, head)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {head: _save_case(root, family, head) for family, head in CASES}


@pytest.mark.parametrize("family,head", CASES)
def test_package_route_loads_every_head(saved, family, head):
    folder, expected = saved[head]
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pth")) for n in files)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == f"mlpfusion_{family}" and cfg["architectures"] == ["MLPFusion" + head]
    assert cfg["intermediate_sizes"] == [16, 64, 16] and cfg["count_layers"] == [0, 2]
    assert cfg["mlp_layout"]["format"] == 2
    # the count buffers are in the safetensors file, as their own module's buffers
    state = load_file(folder / "model.safetensors")
    counts = [k for k in state if k.endswith(".counts")]
    activation = family_for(family).activation
    assert len(counts) == 2 and all(k.endswith(f"{activation}.counts") for k in counts)
    auto = tiny.auto_class_name(family, head)
    cls = getattr(transformers, auto) if auto else hf_mlpfusion.modeling.model_class_for(head)
    loaded = cls.from_pretrained(folder).eval()
    assert type(loaded).__name__ == "MLPFusion" + head
    assert tiny.max_diff(expected, tiny.outputs(loaded, head)) < 1e-6


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_mlpfusion"] = None  # the package must not be importable here
    import torch, transformers
    from safetensors.torch import load_file
    sys.path.insert(0, sys.argv[2])
    import tiny_io
    report = {}
    for folder, auto in json.loads(sys.argv[1]).items():
        head = folder.rsplit("/", 1)[-1]
        model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
        expected = load_file(folder + "/expected.safetensors")
        got = tiny_io.outputs(model, head)
        diff = max((got[i] - expected[str(i)]).abs().max().item() for i in range(len(expected)))
        report[head] = [type(model).__name__, type(model).__module__, diff, len(got) == len(expected)]
    print(json.dumps(report))
    """
)


def test_trust_remote_code_route_without_the_package(saved, tmp_path):
    folders = {}
    for family, head in CASES:
        folder, expected = saved[head]
        save_file({str(i): t.contiguous() for i, t in enumerate(expected)}, folder / "expected.safetensors")
        if tiny.auto_class_name(family, head):
            folders[str(folder)] = tiny.auto_class_name(family, head)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, json.dumps(folders), str(Path(__file__).parent)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_heads = {h for f, h in CASES if tiny.auto_class_name(f, h)}
    assert set(report) == expected_heads
    for head, (cls_name, module, diff, same_len) in report.items():
        assert cls_name == "MLPFusion" + head
        assert module.startswith("transformers_modules."), module  # the files next to the weights
        assert same_len and diff < 1e-6, (head, diff)


def test_remote_code_files_are_the_package_source_and_the_same_for_every_family(saved):
    src = Path(hf_mlpfusion.modeling.__file__).parent
    for head in ("GPT2LMHeadModel", "LlamaForCausalLM", "DistilBertForMaskedLM"):
        folder, _ = saved[head]
        assert sorted(p.name for p in folder.glob("*.py")) == ["configuration_mlpfusion.py", "modeling_mlpfusion.py"]
        for name in ("configuration_mlpfusion.py", "modeling_mlpfusion.py"):
            assert (folder / name).read_bytes() == (src / name).read_bytes()
    cfg = json.loads((saved["GPT2LMHeadModel"][0] / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_mlpfusion.MLPFusionGPT2LMHeadModel"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_mlpfusion.MLPFusionGPT2Config"


@pytest.mark.parametrize("family", tiny.MODEL_TYPES)
def test_auto_map_lists_every_auto_class_of_the_family(saved, family):
    head = tiny.HEADS[family][0]
    cfg = json.loads((saved[head][0] / "config.json").read_text())
    stock_config = transformers.AutoConfig.for_model(family).__class__
    autos = set()
    for name in dir(transformers):  # every Auto class whose mapping has this model type, for its own config
        names = getattr(getattr(getattr(transformers, name), "_model_mapping", None), "_model_mapping", None)
        if name.startswith("AutoModel") and isinstance(names, dict) and family in names:
            if getattr(getattr(transformers, names[family], None), "config_class", None) is stock_config:
                autos.add(name)
    assert "AutoModel" in autos and set(cfg["auto_map"]) == autos | {"AutoConfig"}


def test_stock_checkpoint_when_folded_with_one_width(tmp_path):
    m = tiny.model("bert", "BertForSequenceClassification")
    fused = fuse(m, FusionConfig(ratio=0.5, fold_scale=True))
    save_fused(fused, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and "auto_map" not in cfg and cfg["intermediate_size"] == 32
    assert not list((tmp_path / "out").glob("*.py"))
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(loaded) is transformers.BertForSequenceClassification
    assert tiny.max_diff(tiny.outputs(fused, "BertForSequenceClassification"),
                         tiny.outputs(loaded, "BertForSequenceClassification")) < 1e-6
