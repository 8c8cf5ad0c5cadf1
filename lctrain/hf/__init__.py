"""Hugging Face conversion: ``convert`` (lctrain checkpoint -> HF folder, native or remote code, verified) and
``import_model`` (HF folder -> a run directory whose training starts from its weights).

    lctrain convert-hf --checkpoint RUN_DIR[/checkpoints/step_N] --out HF_DIR [--dtype bf16|fp32]
    lctrain import-hf  --model HF_DIR --config configs/X.yaml --out RUN_DIR
"""
