"""GPT-2: MLPs in `h[i].mlp.c_fc` / `.c_proj`, `Conv1D` modules whose weights are stored transposed."""

from .base import Adapter, MLPWeights


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)
    fused_model_type = "mlpfusion_gpt2"
    base_class = "GPT2Model"
    heads = (
        "GPT2Model",
        "GPT2LMHeadModel",
        "GPT2DoubleHeadsModel",
        "GPT2ForSequenceClassification",
        "GPT2ForTokenClassification",
        "GPT2ForQuestionAnswering",
    )

    def blocks(self, model):
        return list(model.base_model.h)

    def mlp_modules(self, block):
        return block.mlp.c_fc, block.mlp.c_proj

    def read(self, block):
        c_fc, c_proj = self.mlp_modules(block)
        # Conv1D computes x @ W + b with W [in, out]: transpose into nn.Linear orientation.
        return MLPWeights(c_fc.weight.t(), c_fc.bias, c_proj.weight.t(), c_proj.bias)

    def residual_input(self, block):
        # pre-LN: h + mlp(ln_2(h)): the residual is the input of ln_2
        return block.ln_2

    def tensors(self, w):
        return w.w1.t().contiguous(), w.b1, w.w2.t().contiguous(), w.b2

    def num_layers(self, config):
        return int(config.n_layer)

    def hidden_size(self, config):
        return int(config.n_embd)

    def intermediate_size(self, config):
        return int(config.n_inner) if config.n_inner is not None else 4 * int(config.n_embd)

    def stock_width_update(self, width):
        return {"n_inner": int(width)}
