"""compress --push-to-hub end to end against the fake Hub, with a real fused (custom-class) model."""

import json
import os
import subprocess
import sys
import textwrap

from typer.testing import CliRunner

import tiny
from hf_mlpfusion.cli.main import app
from hub_fixtures import WRITE_TOKEN, hub, hub_env  # noqa: F401  (fixtures)

REPO = "my-org/tiny-gpt2-mlpfusion"

LOAD = textwrap.dedent(
    """
    import sys, torch
    sys.modules["hf_mlpfusion"] = None  # a user without the package
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    with torch.no_grad():
        torch.save(model(torch.tensor([[5, 17, 42, 8]])).logits, sys.argv[2])
    print(type(model).__module__)
    """
)


def test_compress_push_then_load_from_the_hub_with_remote_code(hub, hub_env, tmp_path):  # noqa: F811
    src = tmp_path / "tiny-gpt2"
    tiny.model("gpt2", "GPT2LMHeadModel").save_pretrained(src)
    runner = CliRunner()
    args = ["compress", str(src), "--ratio", "0.25", "--layers", "1,2", "-o", str(tmp_path / "out"),
            "--push-to-hub", REPO, "--endpoint", hub.url, "--token", WRITE_TOKEN]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert f"{hub.url}/{REPO}/commit/" in first.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert REPO in card and "trust_remote_code=True" in card

    again = runner.invoke(app, args + ["--overwrite"])  # CI running the same job twice
    assert again.exit_code == 0, again.output
    assert "no changes; already up to date" in again.stdout

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": WRITE_TOKEN, "HF_HOME": str(tmp_path / "fresh"),
           "HF_HUB_DISABLE_XET": "1"}
    out = tmp_path / "logits.pt"
    proc = subprocess.run([sys.executable, "-c", LOAD, REPO, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("transformers_modules.")
    import torch
    from transformers import AutoModelForCausalLM

    import hf_mlpfusion  # noqa: F401

    local = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        expected = local(torch.tensor([[5, 17, 42, 8]])).logits
    assert torch.allclose(torch.load(out), expected, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mlpfusion_gpt2"


def test_bad_token_fails_before_compressing(hub, hub_env, tmp_path):  # noqa: F811
    src = tmp_path / "tiny-bert"
    tiny.model("bert", "BertModel").save_pretrained(src)
    result = CliRunner().invoke(app, ["compress", str(src), "-o", str(tmp_path / "out"), "--push-to-hub", REPO,
                                      "--endpoint", hub.url, "--token", "hf_wrong"])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
