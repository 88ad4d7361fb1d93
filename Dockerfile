# hf-mlpfusion with CUDA-enabled PyTorch. `mlpfusion` is the entry point; pass the Hub token by
# environment (never bake it into the image):
#
#   docker build -t hf-mlpfusion .
#   docker run --rm --gpus all -e HF_TOKEN --user "$(id -u):$(id -g)" -v "$PWD/out:/work/out" -v hf-cache:/cache/huggingface \
#       hf-mlpfusion compress FacebookAI/roberta-base --ratio 0.25 --layers 4-11 --device cuda \
#       --output out/roberta-base-mlpfusion-0.25 --push-to-hub my-org/roberta-base-mlpfusion-0.25
#
# The base image already has CUDA-enabled torch; `pip install .` keeps it (torch>=2.2,<3 is
# satisfied) and adds transformers, huggingface_hub, safetensors, typer and rich.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /opt/hf-mlpfusion
COPY pyproject.toml README.md ./
COPY hf_mlpfusion ./hf_mlpfusion
COPY model_cards ./model_cards
RUN python -m pip install . \
    && python -c "import torch, hf_mlpfusion.cli.main; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && mkdir -p /cache/huggingface /work \
    && useradd --create-home --uid 1000 mlpfusion \
    && chmod -R a+rwX /cache /work

USER mlpfusion
WORKDIR /work
VOLUME ["/cache/huggingface"]
ENTRYPOINT ["mlpfusion"]
CMD ["--help"]
