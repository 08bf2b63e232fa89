"""EK-FAC and KFAC scores against an independent implementation: the kronfluence library."""

import logging

import pytest
import torch
from tiny_models import conv1d_to_linear, random_batch, tiny_model

from operators.curvature import fit_curvature
from operators.factors import DampingConfig
from operators.scores import InfluenceConfig, precondition_queries, score_batch, units_for
from operators.sequences import sequence_losses

kronfluence = pytest.importorskip("kronfluence")
DAMPING = 1e-3


class LMTask(kronfluence.task.Task):
    def __init__(self, modules):
        self.modules = modules

    def get_influence_tracked_modules(self):
        return self.modules  # the blocks' linear modules, as ours; not lm_head

    def compute_train_loss(self, batch, model, sample=False):
        return sequence_losses(model, batch, sampled=sample).sum()

    def compute_measurement(self, batch, model):
        return sequence_losses(model, batch).sum()

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def as_dataset(batch):
    return [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]


def kronfluence_scores(model, units, train, queries, strategy, tmp_path):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    task = LMTask([unit.name for unit in units])
    model = prepare_model(model, task)
    analyzer = Analyzer("ref", model, task, cpu=True, disable_tqdm=True,
                        output_dir=str(tmp_path), log_level=logging.WARNING)
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=f64,
        gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64)
    analyzer.fit_all_factors("f", as_dataset(train), per_device_batch_size=4,
                             factor_args=factor_args, overwrite_output_dir=True)
    score_args = ScoreArguments(damping_factor=DAMPING, per_sample_gradient_dtype=f64,
                                precondition_dtype=f64, score_dtype=f64)
    analyzer.compute_pairwise_scores("s", "f", as_dataset(queries), as_dataset(train),
                                     per_device_query_batch_size=2,
                                     per_device_train_batch_size=4, score_args=score_args,
                                     overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("s")["all_modules"]  # [queries, train]


@pytest.mark.parametrize("method,strategy", [("ekfac", "ekfac"), ("kfac", "kfac")])
def test_scores_equal_kronfluence(method, strategy, tmp_path):
    model = conv1d_to_linear(tiny_model("gpt2"))
    train, queries = random_batch(batch=8, seed=1), random_batch(batch=3, seed=2)
    config = InfluenceConfig(method=method, fisher="empirical", logodds_cap=1.0,  # log p, as it
                             damping=DampingConfig(absolute=DAMPING))
    units = units_for(model, config)
    curvature = fit_curvature(model, units, [train], corrected=method == "ekfac",
                              fisher="empirical", damping=config.damping)
    features = precondition_queries(model, units, [queries], config, curvature)
    ours = score_batch(model, units, train, features, config).T
    reference = kronfluence_scores(model, units, train, queries, strategy, tmp_path)
    torch.testing.assert_close(ours, reference.to(ours.dtype), rtol=1e-9, atol=1e-9)
