-- bench_family: one row per (method, seed, round, split, family): the bench, one problem
-- family at a time (a bench root only; data/sql/family_summary.sql is the same for one
-- workspace). Weighted by eval_n, a (method, seed, round, split)'s rows give bench's accuracy.
--
--   eval_n, accuracy, mean_think_tokens   the family's evals in that round
--   accuracy_change, accuracy_change_se   minus round 0's on the same problems (same method,
--                                         seed), paired by problem, and its standard error
--   think_change                          mean_think_tokens / round 0's - 1
WITH fam AS (
    SELECT
        method,
        seed,
        round,
        split,
        family,
        count(*) AS eval_n,
        avg(correct::DOUBLE) AS accuracy,
        avg(think_tokens) AS mean_think_tokens
    FROM evals
    GROUP BY method, seed, round, split, family
),
paired AS (
    SELECT
        e.method,
        e.seed,
        e.round,
        e.split,
        e.family,
        avg(e.correct::DOUBLE - b.correct::DOUBLE) AS accuracy_change,
        stddev_samp(e.correct::DOUBLE - b.correct::DOUBLE) / sqrt(count(*)) AS accuracy_change_se
    FROM evals AS e
    JOIN evals AS b
        ON b.round = 0
        AND b.method = e.method
        AND b.seed = e.seed
        AND b.split = e.split
        AND b.problem_id = e.problem_id
        AND b.sample_idx = e.sample_idx
    GROUP BY e.method, e.seed, e.round, e.split, e.family
)
SELECT
    fam.method,
    fam.seed,
    fam.round,
    fam.split,
    fam.family,
    fam.eval_n,
    fam.accuracy,
    fam.mean_think_tokens,
    paired.accuracy_change,
    paired.accuracy_change_se,
    fam.mean_think_tokens / nullif(base.mean_think_tokens, 0) - 1 AS think_change
FROM fam
LEFT JOIN paired USING (method, seed, round, split, family)
LEFT JOIN fam AS base
    ON base.method = fam.method
    AND base.seed = fam.seed
    AND base.round = 0
    AND base.split = fam.split
    AND base.family = fam.family
ORDER BY fam.method, fam.seed, fam.round, fam.split, fam.family
