"""Every DeepSpeed call behind one object: initialise, step, checkpoint, consolidated weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cluster.extension_locks import clear_stale_locks
from operators.errors import UserError


def read_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON config on the driver (workers may run in another folder)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise UserError(f"ibo.deepspeed_config={path}: no such file") from err
    except json.JSONDecodeError as err:
        raise UserError(f"ibo.deepspeed_config={path}: not valid JSON ({err})") from err


def resolve_ds_config(config: dict, use_gpu: bool, dtype: str = "float32") -> dict:
    """``"auto"`` bf16 means on when a GPU supports it, else off; ``model.dtype=bfloat16`` turns
    DeepSpeed's bf16 mode on (bf16 forward and backward, float32 master weights and optimizer
    state), so small updates are not rounded away as they would be in a pure bf16 model."""
    config = json.loads(json.dumps(config))
    if dtype == "bfloat16":
        config.setdefault("bf16", {})["enabled"] = True
    for key in ("bf16", "fp16"):
        if config.get(key, {}).get("enabled") == "auto":
            config[key]["enabled"] = bool(use_gpu and key == "bf16"
                                          and torch.cuda.is_available()
                                          and torch.cuda.is_bf16_supported())
    return config


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory all-reduce op


def skip_inference_shm_op() -> None:
    """Never build DeepSpeed's CPU shared-memory op.

    On the CPU accelerator DeepSpeed JIT-compiles it when its comm backend starts: about a
    minute on each fresh machine, under a build lock a killed build leaves behind. It serves
    only ``inference_all_reduce``, which training never calls (its all-reduces go through
    torch.distributed), so marking it incompatible changes no result.
    """
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__[SHM_OP] = False


class DeepSpeedStrategy:
    """Owns the DeepSpeed engine of one Ray Train worker."""

    def __init__(self, ds_config: dict, lr: float, weight_decay: float = 0.0) -> None:
        self.ds_config, self.lr, self.weight_decay = ds_config, lr, weight_decay
        self.engine = None

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """``deepspeed.initialize`` with a torch optimizer (DeepSpeed's own Adam compiles ops)."""
        clear_stale_locks()  # a build killed earlier would make DeepSpeed's op build wait forever
        import deepspeed
        skip_inference_shm_op()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=self.ds_config, dist_init_required=False)
        return self.engine

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def save(self, directory: Path, step: int) -> None:
        """A resumable checkpoint (all ranks must call it)."""
        self.engine.save_checkpoint(str(directory), tag="state", client_state={"step": step})

    def load(self, directory: Path) -> int:
        """Resume; returns the number of steps already done."""
        path, client = self.engine.load_checkpoint(str(directory), tag="state")
        if path is None:  # DeepSpeed only warns; restarting from zero silently would redo work
            raise RuntimeError(f"cannot resume: no DeepSpeed checkpoint under {directory}")
        return int(client["step"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on every rank (gathered under ZeRO-3)."""
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
