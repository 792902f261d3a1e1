"""Export a checkpoint's weights to the diffusers ecosystem.

    python training/export.py --checkpoint RUN_OR_CHECKPOINT --out DIR

A Wan checkpoint (`model.kind: wan`) becomes `DIR/transformer/` — config.json and
diffusion_pytorch_model.safetensors, loadable by `WanTransformer3DModel.from_pretrained` and so
by a `WanPipeline` whose transformer it replaces — made from the checkpoint's EMA weights (its
plain weights when the run kept no EMA); a LoRA checkpoint (`model.lora_rank` > 0) becomes
`DIR/lora/pytorch_lora_weights.safetensors`, loadable by `WanPipeline.load_lora_weights` on
the base model it was trained on. `DIR/ditharos_export.json` says where they came from. A run dir exports its latest checkpoint; checkpoints on object storage are read through
pyarrow.fs. DIR must not exist yet or be empty: an export never mixes with other files.

DiTharos's own DiT is not a diffusers model: its checkpoint's ema.safetensors + trainer_state.json
already are its standalone weights, and exporting one is refused saying so.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python training/export.py`: import the package, not sibling files
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import checkpoint as ckpt  # noqa: E402
from training.wan import LORA_BASE_SEED  # noqa: E402


class ExportError(ValueError):
    """A checkpoint or output folder that cannot be exported to (named, with why)."""


def export(checkpoint: str, out: str | Path) -> dict[str, Any]:
    """Write the diffusers folder for `checkpoint` (a checkpoint or run dir) under `out`; returns the record."""
    from diffusers import WanTransformer3DModel

    try:
        checkpoint = ckpt.resolve(checkpoint)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: choose a new --out")
    state, tensors = ckpt.load_weights(checkpoint)
    kind = state.model.get("kind", "ditharos")
    if kind != "wan":
        raise ExportError(f"{checkpoint} is a DiTharos DiT checkpoint: not a diffusers model; its {state.weights} and "
                          f"{ckpt.STATE_FILE} already are its standalone weights and config")
    record = {"checkpoint": checkpoint, "steps_done": state.steps_done, "weights": state.weights,
              "ema": state.weights == ckpt.EMA_FILE, "base": state.model["source"],
              "random_init": str(state.model["source"]).startswith("random-init"),
              "data_uri": state.data_uri, "data_fingerprint": state.data_fingerprint,
              "code_version": state.code_version}
    lora = state.model.get("lora")
    if lora:
        record["lora"] = str(_export_lora(tensors, lora, out / "lora"))
        record["lora_config"] = lora
        if record["random_init"]:
            record["base_seed"] = LORA_BASE_SEED  # the preset's base: rebuilt from this seed, not saved
    else:
        from accelerate import init_empty_weights

        with init_empty_weights():  # parameters on the meta device: the checkpoint's tensors are assigned
            model = WanTransformer3DModel.from_config(state.model["config"])  # as backbone.from_record reads it
        # PackedWan holds diffusers' module as `.model`: its keys are diffusers' own under that prefix.
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()}, strict=True, assign=True)
        model.save_pretrained(out / "transformer", safe_serialization=True)
        record["transformer"] = str(out / "transformer")
    (out / "ditharos_export.json").write_text(json.dumps(record, indent=1))
    return record


def _export_lora(tensors: dict[str, Any], lora: dict[str, Any], folder: Path) -> Path:
    """The adapter as diffusers' Wan LoRA file (`WanPipeline.save_lora_weights`, with its LoraConfig as metadata)."""
    from diffusers import WanPipeline
    from peft import LoraConfig

    # "model.blocks.0.attn1.to_q.lora_A.default.weight" (PackedWan.model, peft's adapter "default")
    # → "blocks.0.attn1.to_q.lora_A.weight", what get_peft_model_state_dict gives diffusers' scripts
    layers = {re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k.removeprefix("model.")): v for k, v in tensors.items()}
    config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=list(lora["targets"]),
                        init_lora_weights=True)
    WanPipeline.save_lora_weights(str(folder), transformer_lora_layers=layers,
                                  transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run dir (its latest checkpoint)")
    p.add_argument("--out", required=True, help="a new or empty folder for the diffusers export")
    args = p.parse_args(argv)
    try:
        record = export(args.checkpoint, args.out)
    except ExportError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
