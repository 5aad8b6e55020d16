-- family_summary: one row per (round, split, family) of the evals: round_summary's evaluation
-- columns, one problem family at a time.
--
-- Why: an aggregate that holds can hide a trade between families (one family shortens and
-- loses accuracy while another gains). The rows weighted by eval_n sum to round_summary's
-- (accuracy on the test split, heldout_accuracy on the held-out one); tests/test_catalog.py
-- checks it. The held-out split is the families no model trained on: its row measures whether
-- the new length habit carries over to an unseen kind of problem.
--
--   eval_n, accuracy                  rows of the family in that split and round, mean correct
--   mean_think_tokens, mean_total_tokens, truncation_rate
--   accuracy_change, accuracy_change_se   accuracy minus round 0's, paired by problem (the
--                                     same problems in both rounds) and its standard error
--   think_change                      mean_think_tokens / round 0's (same split, family) - 1
WITH fam AS (
    SELECT
        round,
        split,
        family,
        count(*) AS eval_n,
        avg(correct::DOUBLE) AS accuracy,
        avg(think_tokens) AS mean_think_tokens,
        avg(total_tokens) AS mean_total_tokens,
        avg(truncated::DOUBLE) AS truncation_rate
    FROM evals
    GROUP BY round, split, family
),
paired AS (
    SELECT
        e.round,
        e.split,
        e.family,
        avg(e.correct::DOUBLE - b.correct::DOUBLE) AS accuracy_change,
        stddev_samp(e.correct::DOUBLE - b.correct::DOUBLE) / sqrt(count(*)) AS accuracy_change_se
    FROM evals AS e
    JOIN evals AS b
        ON b.round = 0
        AND b.split = e.split
        AND b.problem_id = e.problem_id
        AND b.sample_idx = e.sample_idx
    GROUP BY e.round, e.split, e.family
)
SELECT
    fam.round,
    fam.split,
    fam.family,
    fam.eval_n,
    fam.accuracy,
    fam.mean_think_tokens,
    fam.mean_total_tokens,
    fam.truncation_rate,
    paired.accuracy_change,
    paired.accuracy_change_se,
    fam.mean_think_tokens / nullif(base.mean_think_tokens, 0) - 1 AS think_change
FROM fam
LEFT JOIN paired USING (round, split, family)
LEFT JOIN fam AS base ON base.round = 0 AND base.split = fam.split AND base.family = fam.family
ORDER BY fam.round, fam.split, fam.family
