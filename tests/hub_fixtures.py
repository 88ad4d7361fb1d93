"""Fixtures for the publishing tests: a fake Hub on 127.0.0.1 and a tiny checkpoint folder.

Import them explicitly in a test module: `from hub_fixtures import hub, hub_env, tiny_checkpoint`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import OTHER_WRITE_TOKEN, READ_TOKEN, WRITE_TOKEN, HubServer, HubState  # noqa: E402

__all__ = ["hub", "hub_env", "tiny_checkpoint", "WRITE_TOKEN", "READ_TOKEN", "OTHER_WRITE_TOKEN", "make_checkpoint"]

MLPFUSION_META = {
    "method": "fusion",
    "ratio": 0.5,
    "intermediate_size": None,
    "layers": [0, 1],
    "seed": 0,
    "source_model": "sentence-transformers/all-MiniLM-L6-v2",
    "base_model": "sentence-transformers/all-MiniLM-L6-v2",
    "library_version": "0.1.0",
    "fold_scale": True,
    "widths_before": [64, 64],
    "widths_after": [32, 32],
    "num_parameters_before": 30000,
    "num_parameters_after": 25000,
    "inertia": [1.25, 2.5],
    "kmeans": {"n_init": 3, "max_iter": 100, "algorithm": "lloyd"},
}


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Isolate the client: no stored login, no HF_TOKEN, private cache, Xet off (the fake Hub has no Xet)."""
    import huggingface_hub.constants as c

    home = tmp_path / "hf_home"
    home.mkdir()
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(c, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.fixture
def hub(hub_env):
    """A running fake Hub; `hub.url` is the endpoint, `hub.state` its storage."""
    server = HubServer(state=HubState()).start()
    try:
        yield server
    finally:
        server.stop()


def make_checkpoint(folder: Path, *, seed: int = 0, with_card: bool = False) -> Path:
    """A tiny BERT written by save_pretrained, with an `mlpfusion` block added to config.json."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     vocab_size=100, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    model.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["mlpfusion"] = dict(MLPFUSION_META)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if with_card:
        from hf_mlpfusion.hub import write_model_card

        write_model_card(folder)
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "out", with_card=True)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
