"""The metric definitions (docs/trainer.md, Metrics) checked against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from finetune_trainer.data import IGNORE, Collator, Example, SequenceDataset
from finetune_trainer.evaluation import TokenStats, evaluate_model, finalize, token_stats


def test_token_stats_match_hand_computation() -> None:
    # vocabulary of 3; one sequence of 4 tokens -> 3 predictions; the middle target is masked.
    logits = torch.log(
        torch.tensor(
            [[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [1 / 3, 1 / 3, 1 / 3]]], dtype=torch.float64
        )
    )
    labels = torch.tensor([[2, 0, IGNORE, 1]])
    stats = token_stats(logits, labels)
    # predictions: position 0 predicts labels[1]=0 with p=0.7 (argmax 0: correct);
    # position 1 predicts labels[2]=IGNORE (skipped); position 2 predicts labels[3]=1 with p=0.4 (argmax 1: correct)
    expected_sum = -math.log(0.7) - math.log(0.4)
    assert stats.tokens == 2
    assert stats.correct == 2
    assert stats.loss_sum == pytest.approx(expected_sum, rel=1e-6)
    result = finalize(stats)
    assert result.loss == pytest.approx(expected_sum / 2, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected_sum / 2), rel=1e-6)
    assert result.accuracy == 1.0


def test_pooling_is_token_weighted_not_mean_of_means() -> None:
    many = TokenStats(loss_sum=10.0, correct=4, tokens=10)  # mean loss 1.0
    few = TokenStats(loss_sum=2.0, correct=0, tokens=1)  # mean loss 2.0
    pooled = finalize(many + few)
    assert pooled.loss == pytest.approx(12.0 / 11)  # not (1.0 + 2.0) / 2
    assert pooled.accuracy == pytest.approx(4 / 11)


class _Unigram(torch.nn.Module):
    """A 'model' whose logits are fixed per input token: easy to compute by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        class Out:
            logits = self.table[input_ids]

        return Out()


def test_evaluate_model_pools_batches_and_ignores_padding() -> None:
    table = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]))
    dataset = SequenceDataset([Example([0, 1, 2], [0, 1, 2]), Example([2, 0], [IGNORE, 1])])
    result = evaluate_model(
        _Unigram(table),
        dataset,
        collator=Collator(pad_id=0),
        micro_batch=2,
        max_batches=None,
        device=torch.device("cpu"),
    )
    # seq 1: 0->1 (p .25, argmax 0 wrong), 1->2 (p .3, argmax 1 wrong); seq 2: 2->1 (p .2, argmax 2 wrong)
    expected = -(math.log(0.25) + math.log(0.3) + math.log(0.2)) / 3
    assert result.tokens == 3
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.accuracy == 0.0
