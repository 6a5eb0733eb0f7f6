"""Hugging Face interop: import/export Llama and Qwen2 checkpoints (config.json + safetensors).

    dcwdist hf-import HF_DIR RUN_DIR --recipe recipes/finetune_hf_dcw.yaml
    dcwdist hf-export RUN_DIR OUT_DIR [--checkpoint latest|stepNNNNNNNN] [--dtype bfloat16]

Training can also start from a checkpoint directly: `model.init_from=HF_DIR`.
"""
from dcwdist.hf.hfconfig import adopt_hf_config, model_config_from_hf
from dcwdist.hf.weights import load_hf_weights

__all__ = ["adopt_hf_config", "model_config_from_hf", "load_hf_weights"]
