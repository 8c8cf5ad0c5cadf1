"""Hugging Face conversion: ``lctrain.hf.export.convert`` (an lctrain checkpoint as a Hugging Face folder, native or
remote code, verified) and ``lctrain.hf.importer.import_model`` (a Hugging Face folder as a run directory whose
training starts from its weights).

    lctrain convert-hf --checkpoint RUN_DIR[/checkpoints/step_N] --out HF_DIR [--dtype bf16|fp32]
    lctrain import-hf  --model HF_DIR --config configs/X.yaml --out RUN_DIR
"""
