"""Loading the user's Hugging Face causal LM and tokenizer, with errors a person can act on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from operators.errors import UserError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


# Any one of these is a complete tokenizer (a BPE vocab.json also needs its merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json", "vocab.txt", "tiktoken.model")


class ModelLoadError(UserError):
    """The model directory is missing, incomplete, corrupt or of an unsupported architecture."""


def _check_tokenizer_files(path: Path, key: str = "model.path") -> None:
    """Without its files transformers builds a tokenizer with an empty vocabulary and every
    score downstream is computed from it: refuse instead, naming what is missing."""
    present = [name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present and not any(path.glob("*.tiktoken")):
        raise ModelLoadError(f"{key}={path}: no tokenizer files (missing tokenizer.json; "
                             f"or one of {', '.join(TOKENIZER_FILES[1:])})")
    if present == ["vocab.json"] and not (path / "merges.txt").is_file():
        raise ModelLoadError(f"{key}={path}: vocab.json without merges.txt (missing "
                             "merges.txt or tokenizer.json)")


def check_model_dir(path: str | Path, tokenizer: bool = True, key: str = "model.path") -> Path:
    """Refuse a missing or incomplete model directory before any worker tries to load it
    (``tokenizer=False``: the weights alone, e.g. a model whose tokenizer is read elsewhere;
    ``key``: the config key that names it, in the errors)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{key}={path}: no such directory")
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{key}={path}: no config.json (not a Hugging Face model dir)")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config}: not valid JSON ({err})") from err
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{key}={path}: no weights (*.safetensors) found")
    if tokenizer:
        _check_tokenizer_files(path, key)
    return path


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The model's tokenizer; one without a pad token gets EOS as its pad token."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types for a broken tokenizer
        raise ModelLoadError(f"model.path={path}: cannot load the tokenizer ({err})") from err
    if len(tok) < 2:
        raise ModelLoadError(f"model.path={path}: the tokenizer has an empty vocabulary "
                             f"({len(tok)} tokens): its files are incomplete")
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"model.path={path}: the tokenizer has neither pad nor eos token")
        tok.pad_token = tok.eos_token
    return tok


LINFAC_ATTENTION = "lancet_sdpa"


def register_attention() -> str:
    """Register ``lancet_sdpa`` with transformers (idempotent; every process that loads a model).

    SDPA computes the attention output (and its backward); ``operators.attention`` recomputes
    the head-averaged probabilities LinFAC's unit reads, chunked and without gradient, and
    returns them as the attention weights ``[B, 1, T, T]``.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from operators.attention import head_averaged_probs

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        dropout=dropout, scaling=scaling, **kw)
        probs = head_averaged_probs(query, key, attention_mask, scaling)
        return out, probs.unsqueeze(1).to(query.dtype)

    AttentionInterface.register(LINFAC_ATTENTION, forward)
    AttentionMaskInterface.register(LINFAC_ATTENTION, sdpa_mask)
    return LINFAC_ATTENTION


def attention_for(config, wants_probabilities: bool) -> str | None:
    """``lancet_sdpa`` where LinFAC needs ā; eager for a model with logit soft-capping (which
    SDPA cannot do) or whose attention does not go through transformers' attention interface
    (GPT-J, Falcon, BLOOM: loading them with a registered implementation fails); None (the
    model's default) otherwise."""
    if not wants_probabilities:
        return None
    if getattr(config, "attn_logit_softcapping", None) or not _takes_attention_interface(config):
        return "eager"
    return register_attention()


def _takes_attention_interface(config) -> bool:
    """Whether the causal-LM class of ``config`` accepts a registered attention function.
    A class transformers cannot name from the config (remote code) is assumed to."""
    from transformers import AutoModelForCausalLM
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError):
        return True
    return bool(getattr(model_class, "_supports_attention_backend", False))


def load_model(path: str | Path, dtype: str = "float32", eager_attention: bool = True,
               trust_remote_code: bool = False, device: str = "cpu"):
    """A causal LM in eval mode.

    ``eager_attention``: the attention must expose the head-averaged probabilities LinFAC's unit
    needs; they come from ``lancet_sdpa`` (SDPA plus a chunked recomputation), not eager.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    path = check_model_dir(path, tokenizer=False)
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if eager_attention:
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as err:
            raise ModelLoadError(f"model.path={path}: cannot read config.json ({err})") from err
        kwargs["attn_implementation"] = attention_for(config, True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as err:
        raise ModelLoadError(f"model.path={path}: cannot load the model ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from err
    return model.to(device).eval()
