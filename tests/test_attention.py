"""LinFAC's head-averaged attention without eager attention: same ā, same κ (float64)."""

import pytest
import torch
from tiny_models import FAMILIES, random_batch, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from cluster.model_io import LINFAC_ATTENTION, attention_for, register_attention
from operators.attention import head_averaged_probs
from operators.capture import Capture
from operators.units import discover_units


def kappas(config, implementation, batch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    model = model.double().eval()
    units = [u for u in discover_units(model, "linfac") if u.mix_tokens]
    with Capture(units) as cap:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return [cap.kappa(u, batch["attention_mask"]) for u in units]


def gqa_config():
    return LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("family", [*FAMILIES, "llama-gqa"])
def test_sdpa_with_recomputed_average_gives_eager_kappa(family):
    register_attention()
    config = gqa_config() if family == "llama-gqa" else tiny_config(family)
    batch = random_batch(batch=3)
    eager = kappas(config, "eager", batch)
    fast = kappas(config, LINFAC_ATTENTION, batch)
    for want, got in zip(eager, fast, strict=True):
        # SDPA's float64 CPU kernel itself differs from eager by ~1e-9 per layer
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding", [True, False])
def test_recomputed_probabilities_equal_the_eager_softmax(padding):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    mask = causal.expand(2, 1, 5, 5).clone()
    if padding:
        mask[1, :, :, 3:] = False  # the second row's last two keys are padding
    kk = k.repeat_interleave(2, dim=1)
    scores = (q @ kk.mT * 0.5).masked_fill(~mask, float("-inf"))
    want = torch.softmax(scores, dim=-1).mean(dim=1)
    got = head_averaged_probs(q, k, mask if padding else None, 0.5, chunk=3)
    rows = slice(None) if not padding else slice(0, 3)
    torch.testing.assert_close(got[:, rows], want[:, rows])


LLAMA_LIKE = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
NEWER = {"qwen3": dict(head_dim=4), "gemma3_text": dict(head_dim=4), "phi3": {}, "olmo2": {},
         "granite": {}, "cohere": {}, "starcoder2": {}}


@pytest.mark.parametrize("family", sorted(NEWER))
def test_newer_families_get_the_fast_attention_and_eager_kappa(family):
    config = AutoConfig.for_model(family, **LLAMA_LIKE, **NEWER[family])
    assert attention_for(config, True) == LINFAC_ATTENTION
    batch = random_batch(batch=3)
    for want, got in zip(kappas(config, "eager", batch), kappas(config, LINFAC_ATTENTION, batch),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


OUTSIDE_INTERFACE = {
    "gptj": dict(vocab_size=40, n_embd=16, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    "falcon": dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                   num_kv_heads=2, new_decoder_architecture=True),
    "bloom": dict(vocab_size=40, hidden_size=16, n_layer=2, n_head=4),
}


@pytest.mark.parametrize("family", sorted(OUTSIDE_INTERFACE))
def test_models_outside_the_attention_interface_load_eager_with_causal_probabilities(family):
    """GPT-J, Falcon and BLOOM refuse a registered attention function; LinFAC takes eager's
    probabilities there (Falcon and BLOOM name the sublayer ``self_attention``)."""
    config = AutoConfig.for_model(family, **OUTSIDE_INTERFACE[family])
    assert attention_for(config, True) == "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").double().eval()
    units = discover_units(model, "linfac")
    assert [u.mix_tokens for u in units] == [True, False, True, False]
    batch = random_batch(batch=3)
    with Capture(units) as cap:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    probs = cap.records[units[0].name].attention
    mask = batch["attention_mask"].bool()
    keys = mask[:, None, :] & torch.ones(10, 10, dtype=torch.bool).tril()
    assert probs.masked_select(~keys).abs().max() < 1e-12  # no weight on future or padding keys
    torch.testing.assert_close(probs.sum(-1)[mask], torch.ones(int(mask.sum()), dtype=probs.dtype))
