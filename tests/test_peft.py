"""PEFT on fused models: LoRA on the MLP projections merges exactly, because the count vector is its
own module between the activation and the output projection, and every projection is a stock
nn.Linear / Conv1D that PEFT knows."""

import pytest
from peft import LoraConfig, get_peft_model

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.families import family_for

CASES = [(mt, h) for mt, h in tiny.one_head_per_type() if mt in ("bert", "gpt2", "llama", "distilbert")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_type,head", CASES)
def test_lora_merge_and_unload_is_exact_on_a_fused_model(model_type, head):
    family = family_for(model_type)
    fused = fuse(tiny.model(model_type, head), FusionConfig(ratio=0.25, layers=[0, 2], seed=0))
    targets = sorted({p.rsplit(".", 1)[-1] for p in (*family.inputs, family.output)})
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        fan_in_fan_out=model_type == "gpt2")
    peft_model = get_peft_model(fused, config).eval()
    adapted = tiny.outputs(peft_model, head)
    base_out = None
    with peft_model.disable_adapter():
        base_out = tiny.outputs(peft_model, head)
    assert tiny.max_diff(adapted, base_out) > 1e-4  # the adapter does change the outputs
    merged = peft_model.merge_and_unload().eval()
    assert tiny.max_diff(adapted, tiny.outputs(merged, head)) < 1e-5
    # the count modules survived the merge untouched
    for i in (0, 2):
        assert family.act(family.block_list(merged)[i]).counts.sum().item() == 64
