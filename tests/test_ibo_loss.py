"""IBO losses against hand-computed references; the α selection rule."""

import numpy as np
import pytest
import torch
from tiny_models import random_batch, tiny_model

from operators.errors import UserError
from operators.ibo_loss import (
    IBOLossConfig,
    bregman_loss,
    correction_loss,
    distinct_tokens,
    token_correction_loss,
    topk_reference,
)
from operators.selection import SelectionConfig, make_pairs, select_sets
from operators.sequences import sequence_log_probs


def test_cor_equals_the_dpo_sigmoid_loss_with_eps_one():
    pol_pos, pol_neg = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    ref_pos, ref_neg = torch.tensor([-2.5, -1.5]), torch.tensor([-2.2, -3.0])
    beta = 0.1
    losses, metrics = correction_loss(pol_pos, pol_neg, ref_pos, ref_neg, torch.ones(2), beta)
    # DPO: −log σ(β[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)]), chosen = z−
    by_hand = [-np.log(1 / (1 + np.exp(-beta * ((pn - rn) - (pp - rp)))))
               for pp, pn, rp, rn in zip([-3.0, -1.0], [-2.0, -4.0], [-2.5, -1.5], [-2.2, -3.0])]
    torch.testing.assert_close(losses, torch.tensor(by_hand, dtype=torch.float32))
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"} <= set(metrics)


def _token_loss_by_hand(pol_pos, pol_neg, ref_pos, ref_neg, mask_pos, mask_neg, eps, beta):
    """−ε · mean over z+'s tokens of log σ(β·mean_s Δ_s(z−) − β·Δ_t(z+)), in float64 loops."""
    out = []
    for p in range(len(eps)):
        neg = [pol_neg[p][s] - ref_neg[p][s] for s in range(len(mask_neg[p])) if mask_neg[p][s]]
        chosen = beta * sum(neg) / len(neg)
        terms = [np.log(1 / (1 + np.exp(-(chosen - beta * (pol_pos[p][t] - ref_pos[p][t])))))
                 for t in range(len(mask_pos[p])) if mask_pos[p][t]]
        out.append(-eps[p] * sum(terms) / len(terms))
    return out


def test_token_cor_is_its_definition_on_masked_tokens_of_unequal_sides():
    gen = np.random.default_rng(0)
    pol_pos, ref_pos = gen.normal(-2, 1, (2, 5)), gen.normal(-2, 1, (2, 5))
    pol_neg, ref_neg = gen.normal(-2, 1, (2, 7)), gen.normal(-2, 1, (2, 7))
    mask_pos = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])  # padding and prompt are masked
    mask_neg = np.array([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]])
    eps, beta = [0.7, 1.0], 3.0
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    losses, metrics = token_correction_loss(t(pol_pos), t(pol_neg), t(ref_pos), t(ref_neg),
                                            t(mask_pos), t(mask_neg), t(eps), beta)
    want = _token_loss_by_hand(pol_pos, pol_neg, ref_pos, ref_neg, mask_pos, mask_neg, eps, beta)
    torch.testing.assert_close(losses, t(want))
    assert 0 <= float(metrics["rewards/rejected_tokens_below"]) <= 1


def test_token_cor_equals_the_sequence_cor_on_one_token_answers():
    gen = np.random.default_rng(1)
    pol_pos, pol_neg, ref_pos, ref_neg = (torch.tensor(gen.normal(-2, 1, (3, 1))) for _ in "abcd")
    mask, eps = torch.ones(3, 1), torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    tok, _ = token_correction_loss(pol_pos, pol_neg, ref_pos, ref_neg, mask, mask, eps, 0.4)
    seq, _ = correction_loss(pol_pos[:, 0], pol_neg[:, 0], ref_pos[:, 0], ref_neg[:, 0], eps, 0.4)
    torch.testing.assert_close(tok, seq)


def test_token_cor_keeps_pushing_a_sure_token_after_the_others_fell():
    """Why per token: z+'s opening already fell 12 nats below θs, its memorised phrase has not
    moved. The sequence loss has saturated on the sum and all but stops; per token, the
    phrase's own log-ratio still gets about half of β's weight."""
    ratio = torch.tensor([[-12.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    zero, mask, eps = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, 3), torch.ones(1)
    neg = torch.zeros(1, 1, dtype=torch.float64)
    tok, _ = token_correction_loss(ratio, neg, zero, neg, mask, torch.ones(1, 1), eps, 3.0)
    (tok_grad,) = torch.autograd.grad(tok.sum(), ratio)
    seq, _ = correction_loss(ratio.sum(1), neg[:, 0], zero.sum(1), neg[:, 0], eps, 3.0 / 3)
    (seq_grad,) = torch.autograd.grad(seq.sum(), ratio)
    assert float(tok_grad[0, 1]) > 0.4 and float(tok_grad[0, 0]) < 1e-4  # the phrase, not the opening
    assert float(seq_grad[0, 1]) < 1e-4  # sequence level: the phrase's gradient is gone too


def test_distinct_tokens_drops_what_z_minus_also_says_and_keeps_a_row_with_nothing_else():
    pos = torch.tensor([[5, 7, 8, 9, 2, 0], [5, 3, 4, 2, 0, 0]])
    mask_pos = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])  # prompt 5, padding 0
    neg = torch.tensor([[5, 7, 2, 0], [5, 3, 4, 2]])  # z−: 7 and the end of turn 2; 3, 4 and 2
    mask_neg = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    keep = distinct_tokens(pos, mask_pos, neg, mask_neg)
    assert keep.tolist()[0] == [False, False, True, True, False, False]  # 8, 9: z+'s own
    assert keep[1].tolist() == mask_pos[1].bool().tolist()  # all shared: the pair still moves
    # a token in z−'s prompt only (5) is not shared: only z−'s loss-masked tokens count
    keep = distinct_tokens(torch.tensor([[1, 5]]), torch.tensor([[0, 1]]),
                           torch.tensor([[5, 6]]), torch.tensor([[0, 1]]))
    assert keep.tolist() == [[False, True]]


def test_rejected_tokens_is_checked_with_its_key():
    with pytest.raises(UserError, match="ibo.rejected_tokens='some': expected one of distinct"):
        IBOLossConfig(rejected_tokens="some")


def test_bregman_is_zero_at_the_reference_and_positive_elsewhere():
    model = tiny_model("gpt2", dtype=torch.float32)
    batch = random_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    for k in (40, 8):  # the full vocabulary, and a top-k reference
        ref_logp, ref_idx = topk_reference(logits, k)
        zero = bregman_loss(logits, ref_logp, ref_idx, batch["attention_mask"])
        assert float(zero.abs().max()) < 1e-6
        moved = bregman_loss(logits + torch.randn_like(logits), ref_logp, ref_idx,
                             batch["attention_mask"])
        assert bool((moved > 1e-4).all())


def test_one_gradient_step_lowers_log_p_of_z_plus_relative_to_z_minus():
    model = tiny_model("gpt2", dtype=torch.float32)
    pos, neg = random_batch(batch=2, seed=1), random_batch(batch=2, seed=2)

    def logps():
        lp = sequence_log_probs(model(input_ids=pos["input_ids"]).logits, pos["input_ids"],
                                pos["loss_mask"])
        ln = sequence_log_probs(model(input_ids=neg["input_ids"]).logits, neg["input_ids"],
                                neg["loss_mask"])
        return lp, ln

    with torch.no_grad():
        ref_pos, ref_neg = logps()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lp, ln = logps()
    losses, _ = correction_loss(lp, ln, ref_pos, ref_neg, torch.ones(2), IBOLossConfig().beta)
    losses.mean().backward()
    opt.step()
    with torch.no_grad():
        new_pos, new_neg = logps()
    assert float((new_pos - ref_pos).mean()) < float((new_neg - ref_neg).mean())


def test_alpha_rule_takes_the_shortest_prefix_holding_alpha_of_the_mass():
    scores = np.array([5.0, 3.0, 1.0, 1.0, 0.0, -4.0, -1.0, 0.2] + [0.0] * 32)
    sets = select_sets(scores, SelectionConfig(alpha=0.8, max_fraction=0.2))
    # positive mass 10.2: 5 + 3 = 8 < 8.16, so 5, 3, 1 are needed
    assert sorted(np.nonzero(sets == "positive")[0].tolist()) == [0, 1, 2]
    assert np.nonzero(sets == "negative")[0].tolist() == [5]  # 4 of 5 = 0.8 of the mass
    capped = select_sets(scores, SelectionConfig(alpha=1.0, max_fraction=0.05))
    assert (capped == "positive").sum() == 2  # floor(0.05 * 40)


def test_pairs_cycle_the_smaller_set_and_eps_is_in_unit_interval():
    scores = np.array([4.0, 2.0, 1.0, -3.0, 0.0, 0.0])
    sets = np.array(["positive"] * 3 + ["negative"] + ["neutral"] * 2, dtype=object)
    pairs = make_pairs(scores, sets)
    assert len(pairs) == 3 and {p[1] for p in pairs} == {3}
    assert all(0 < eps <= 1 for _, _, eps in pairs)


def test_the_pair_power_sharpens_eps_towards_the_top_of_d_plus_keeping_its_mean():
    """ε^p rescaled to the plain ε's mean: the same pairs in the same order, the most
    influential z+ weighted most, the tail of D_IF+ (where false positives sit) least."""
    scores = np.array([4.0, 3.0, 2.0, 1.5, -1.0, -0.5, 0.0, 0.0])
    sets = np.array(["positive"] * 4 + ["negative"] * 2 + ["neutral"] * 2, dtype=object)
    plain, sharp = make_pairs(scores, sets), make_pairs(scores, sets, power=8.0)
    assert [p[:2] for p in plain] == [p[:2] for p in sharp]
    eps, sharpened = (np.array([p[2] for p in pairs]) for pairs in (plain, sharp))
    assert sharpened.mean() == pytest.approx(eps.mean())
    top, tail = np.argmax(eps), np.argmin(eps)
    assert sharpened[top] > eps[top] and sharpened[tail] < eps[tail]
    assert sharpened[top] / sharpened[tail] == pytest.approx((eps[top] / eps[tail]) ** 8)
    assert make_pairs(scores, sets, power=1.0) == plain
    with pytest.raises(UserError, match=r"influence.pair_power=0.5: must be at least 1"):
        SelectionConfig(pair_power=0.5)


def test_under_max_the_negative_set_comes_from_the_most_negative_column_outside_d_plus():
    """With several queries a max-score is negative only for a sample that lowers every one;
    the inhibition (the most negative scaled column) finds the samples that lower some."""
    from operators.scores import aggregate, inhibition
    raw = torch.tensor([[5.0, -4.0], [3.0, 1.0], [0.2, -3.0], [0.1, -1.0], [0.1, 0.1]]
                       + [[0.3, 0.3]] * 15, dtype=torch.float64)
    score, against = aggregate(raw, "max").numpy(), inhibition(raw, "max").numpy()
    assert not (score < 0).any()  # no sample lowers both queries: no negatives by the score
    sets = select_sets(score, SelectionConfig(alpha=0.8, max_fraction=0.2), against)
    assert sets[0] == "positive"  # most negative on query 2, but it drives query 1
    assert sets[2] == "negative" and sets[3] == "negative"
    pairs = make_pairs(score, sets, inhibition=against)
    assert pairs and all(0 < eps <= 1 for _, _, eps in pairs)
    np.testing.assert_array_equal(inhibition(raw, "mean").numpy(), aggregate(raw, "mean").numpy())


def test_a_sample_that_drives_one_output_is_never_an_inhibitor_of_another():
    """A planted row of one wording competes with the outputs of the other wording (it lowers
    them) while driving the behaviour: outside D_IF+ (the cap is full) it must stay neutral,
    not be raised by IBO as an inhibitor; a row below the typical score that lowers an output
    is one."""
    from operators.scores import aggregate, inhibition
    raw = torch.tensor([[6.0, -1.0], [4.0, -6.0], [0.1, -2.0]] + [[0.5, 0.4]] * 17,
                       dtype=torch.float64)
    score, against = aggregate(raw, "max").numpy(), inhibition(raw, "max").numpy()
    sets = select_sets(score, SelectionConfig(alpha=1.0, max_fraction=0.05), against)
    assert sets[0] == "positive" and (sets == "positive").sum() == 1  # the cap: 1 of 20
    assert sets[1] == "neutral"  # lowers output 2 the most, but drives output 1
    assert sets[2] == "negative"
    # under mean the inhibition is the score: every negative score is still eligible
    mean = aggregate(raw, "mean").numpy()
    assert select_sets(mean - 1.0, SelectionConfig(alpha=1.0), mean - 1.0)[2] == "negative"


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_alpha_out_of_range_is_refused_with_the_key(alpha):
    with pytest.raises(ValueError, match="influence.alpha"):
        SelectionConfig(alpha=alpha)
