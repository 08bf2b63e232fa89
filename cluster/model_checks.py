"""Start-up checks of the model folders against the config: what would otherwise fail inside a
worker, after the factors were fitted (an index past the position or token embeddings, a LoRA
module the model does not have, a judge that cannot be loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cluster.model_io import ModelLoadError, check_model_dir, load_tokenizer
from operators.errors import UserError

# config.json keys that bound the positions a model embeds, by architecture family.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def _config(path: str | Path) -> dict:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):  # check_model_dir names what is wrong with the file
        return {}
    return config if isinstance(config, dict) else {}


def model_positions(path: str | Path) -> tuple[str, int] | None:
    """(key, value) of the longest sequence the model's config.json allows, if it says."""
    config = _config(path)
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def check_model_fits(path: str | Path, max_length: int, trust_remote_code: bool = False) -> None:
    """``model.max_length`` within the model's positions, and every token id the tokenizer
    gives (its vocabulary, pad, eos, bos) within the model's embeddings."""
    positions = model_positions(path)
    if positions is not None and max_length > positions[1]:
        key, value = positions
        raise UserError(f"model.max_length={max_length}: the model at {path} takes at most "
                        f"{value} tokens ({key} in its config.json); set model.max_length<={value}")
    vocab = _config(path).get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool):
        return
    tok = load_tokenizer(path, trust_remote_code)
    special = [i for i in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) if i is not None]
    largest = max([tok.vocab_size - 1, *special])
    if largest >= vocab:
        raise ModelLoadError(f"model.path={path}: the tokenizer gives token ids up to {largest} "
                             f"but the model embeds {vocab} (vocab_size in its config.json): "
                             "the tokenizer does not belong to these weights")


def weightless_model(path: str | Path, trust_remote_code: bool = False):
    """The model at ``path`` built on the meta device (no weights read), or None for an
    architecture that cannot be built so (the jobs' own loading then says what is wrong)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:
        return None


def check_units(path: str | Path, method: str, module_filter: str = "",
                trust_remote_code: bool = False, model=None) -> list[str]:
    """The model can be cut into ``method``'s units (else ``UnsupportedModelError`` now, not in
    the factor job's workers); returns the blocks' weight matrices no unit covers, which the
    caller reports (an empty list under a ``module_filter``, which leaves the rest out on
    purpose). ``model``: its weightless copy, when the caller has built one."""
    from operators.methods import get_method
    from operators.units import discover_units, uncovered_weights
    if get_method(method).units is None:
        return []
    if model is None:
        model = weightless_model(path, trust_remote_code)
    if model is None:
        return []
    units = discover_units(model, method, module_filter)
    return [] if module_filter else uncovered_weights(model, units)


def check_lora_targets(path: str | Path, targets, trust_remote_code: bool = False,
                       model=None) -> None:
    """Each of ``ibo.lora.target_modules`` names a module of the model (peft's rule: the module's
    name, or the end of its dotted path), read from a weightless copy of the model (``model``,
    when the caller has built one)."""
    if not targets:
        return
    if model is None:
        model = weightless_model(path, trust_remote_code)
    if model is None:  # the job's peft checks
        return
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise UserError(f"ibo.lora.target_modules: {missing} name no module of the model at "
                        f"{path} (its linear modules: {', '.join(linear)})")


def check_classifier_dir(path: str, label: str) -> None:
    """The classifier judge's folder is a complete model and ``judge.label`` is one of its
    labels (when its config.json lists them)."""
    check_model_dir(path, key="judge.path")
    labels = _config(path).get("id2label")
    if isinstance(labels, dict) and labels and label not in labels.values():
        raise UserError(f"judge.label={label!r}: the classifier at {path} has the labels "
                        f"{', '.join(map(str, labels.values()))}")
