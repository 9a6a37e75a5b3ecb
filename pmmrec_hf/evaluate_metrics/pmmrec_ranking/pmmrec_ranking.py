"""PMMRec full-ranking metrics (HR@K, NDCG@K, MRR@K) from each user's target rank.

Self-contained on purpose: ``evaluate`` copies this file into its module cache, so it must not import
``pmmrec_hf``. The arithmetic mirrors ``pmmrec_hf.metrics.ranking_metrics_from_ranks`` line for line
(the package's tests check both return identical dicts).
"""

import numbers

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Full-ranking top-K metrics of the PMMRec paper. Every user's target item is ranked against all items
(history items excluded, the target never excluded), with ties counted pessimistically:
rank = 1 + #(other items scoring higher) + #(other items scoring the same).
Given those ranks, HR@K = 1[rank <= K], NDCG@K = 1/log2(rank + 1) if rank <= K else 0,
MRR@K = 1/rank if rank <= K else 0, each averaged over users.
Compute the ranks with `pmmrec_hf.metrics.target_ranks`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): the 1-based rank of each user's target item (one int >= 1 per user).
    ks (`int` or `list` of `int`, optional): cut-offs K, positive; default [10, 20, 50]. Sorted and deduplicated.
    There is no `references` input: the rank already encodes where the target landed.
Returns:
    `hr@K`, `ndcg@K`, `mrr@K` (float, for each K in ascending order) and `num_users` (int).
Examples:
    >>> metric = evaluate.load("pmmrec_hf/evaluate_metrics/pmmrec_ranking")
    >>> metric.compute(predictions=[1, 3, 11, 60], ks=[10])
    {'hr@10': 0.5, 'ndcg@10': 0.375, 'mrr@10': 0.3333333333333333, 'num_users': 4}
"""

_CITATION = """\
@inproceedings{li2024pmmrec,
  title     = {Multi-Modality is All You Need for Transferable Recommender Systems},
  author    = {Li, Youhua and Du, Hanwen and Ni, Yongxin and Zhao, Pengpeng and Guo, Qi and Yuan, Fajie and Zhou, Xiaofang},
  booktitle = {IEEE International Conference on Data Engineering (ICDE)},
  year      = {2024}
}
"""


def _check_ks(ks):
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = [ks]
    values = list(np.asarray(ks).reshape(-1).tolist()) if not isinstance(ks, (str, bytes)) else None
    if not values:
        raise ValueError(f"ks must be a positive int or a non-empty sequence of positive ints, got {ks!r}")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
            raise ValueError(f"ks must contain only positive ints, got {k!r} in {ks!r}")
    return tuple(sorted({int(k) for k in values}))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PmmrecRanking(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(self, predictions, ks=(10, 20, 50)):
        ks = _check_ks(ks)
        ranks = np.asarray(predictions, dtype=np.int64).reshape(-1)
        if ranks.size == 0:
            raise ValueError("predictions (ranks) must not be empty")
        if ranks.min() < 1:
            raise ValueError(f"predictions (ranks) must be >= 1, got minimum {int(ranks.min())}")
        r = ranks.astype(np.float64)
        out = {}
        for k in ks:
            hit = ranks <= k
            out[f"hr@{k}"] = float(np.mean(hit))
            out[f"ndcg@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)))
            out[f"mrr@{k}"] = float(np.mean(np.where(hit, 1.0 / r, 0.0)))
        out["num_users"] = int(ranks.size)
        return out
