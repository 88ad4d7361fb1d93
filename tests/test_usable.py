"""Fused models stay usable: generation, training (counts frozen), dtype moves, a real MiniLM run."""

import torch
import transformers

import tiny
from hf_mlpfusion import FusionConfig, fuse
from hf_mlpfusion.compress import default_model_path, load_model


def test_gpt2_generate_matches_manual_greedy_decoding():
    fused = fuse(tiny.model("gpt2", "GPT2LMHeadModel"), FusionConfig(ratio=0.25, layers=[1, 2]))
    prompt = torch.tensor([[5, 17, 42]])
    out = fused.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9) and torch.equal(out[:, :3], prompt)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = fused(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_training_step_updates_weights_but_never_counts():
    fused = fuse(tiny.model("bert", "BertForSequenceClassification"), FusionConfig(ratio=0.25))
    fused.train()
    param_names = {n for n, _ in fused.named_parameters()}
    count_names = [n for n, _ in fused.named_buffers() if n.endswith("counts")]
    assert len(count_names) == 3 and not param_names & set(count_names)
    counts_before = {n: b.clone() for n, b in fused.named_buffers() if n.endswith("counts")}
    w_before = fused.bert.encoder.layer[0].output.dense.weight.clone()
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-2)
    batch = tiny.inputs("BertForSequenceClassification", batch=4)
    for _ in range(2):
        loss = fused(**batch, labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        for n, b in fused.named_buffers():
            assert b.grad is None and not b.requires_grad
        opt.step()
        opt.zero_grad()
    assert not torch.equal(w_before, fused.bert.encoder.layer[0].output.dense.weight)
    for n, b in fused.named_buffers():
        if n in counts_before:
            assert torch.equal(b, counts_before[n])


def test_trainer_runs_a_step(tmp_path):
    fused = fuse(tiny.model("roberta", "RobertaForSequenceClassification"), FusionConfig(ratio=0.5))
    ids = tiny.inputs("RobertaForSequenceClassification", batch=8)["input_ids"]
    data = [{"input_ids": ids[i], "labels": i % 2} for i in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                          report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = transformers.Trainer(model=fused, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    counts = fused.roberta.encoder.layer[0].intermediate.intermediate_act_fn.counts
    assert counts.sum().item() == 64


def test_to_dtype_carries_the_count_buffer():
    fused = fuse(tiny.model("gpt2", "GPT2Model"), FusionConfig(ratio=0.25))
    half = fused.to(torch.bfloat16)
    mlp = half.h[0].mlp
    assert mlp.act.counts.dtype == torch.bfloat16 and mlp.c_proj.weight.dtype == torch.bfloat16
    assert mlp.act.counts.sum().item() == 64
    out = half(**tiny.inputs("GPT2Model")).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_real_minilm_fuses_and_stays_close_at_ratio_one_and_below():
    model, family, head = load_model(default_model_path())
    assert head == "BertModel" and family.name == "bert"
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        exact = fuse(model, FusionConfig(ratio=1.0, layers=[0]))(ids).last_hidden_state
        fused = fuse(model, FusionConfig(ratio=0.5, layers=[5]))
        half = fused(ids).last_hidden_state
    assert (exact - ref).abs().max().item() < 1e-4
    rel = ((half - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.5  # one layer at half width: changed, but not destroyed
    assert fused.config.intermediate_sizes == [1536] * 5 + [768]
