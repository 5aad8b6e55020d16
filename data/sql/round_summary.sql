-- round_summary: one row per round that has evals, samples or filter decisions.
--
-- Why these columns: the question every campaign asks is "did think tokens fall
-- while accuracy held?", so the test-split eval numbers come first, then what the
-- round's sampling and filtering did.
--
--   eval_n, accuracy                 test-split evals: rows, mean of `correct`
--   heldout_n, heldout_accuracy      the same on the held-out family
--   mean_think_tokens, mean_answer_tokens, mean_total_tokens, truncation_rate
--                                    over test-split evals only
--   accuracy_change, accuracy_change_se   test accuracy minus round 0's, paired by
--                                    problem (mean of correct_r - correct_0 over the
--                                    problems evaluated in both rounds) and its standard
--                                    error, stddev(d) / sqrt(n): the question is whether
--                                    this round's student is worse, and pairing removes
--                                    the spread of problem difficulty from the answer
--   heldout_accuracy_change, heldout_accuracy_change_se   the same on the held-out family
--   think_change                     mean_think_tokens / round 0's - 1 (-0.4 = 40% fewer)
--   samples_n, sample_accuracy, sample_mean_think_tokens   the round's student samples
--   kept, dropped                    filter decisions
--   dropped_<reason>                 one column per standard reason (0 when none)
--   dropped_by_reason                MAP(VARCHAR, BIGINT) reason -> count over all
--                                    drop reasons, standard or not; prints as
--                                    {not_shorter=3, wrong=1}; query one entry with
--                                    dropped_by_reason['wrong']; {} when none
--
-- Counts are 0 and means NULL for a round without that kind of row (round 0
-- has evals but no samples or decisions). Test and held-out accuracy are kept
-- apart: mixing them would make a change in the held-out share look like a
-- change in accuracy.
WITH rounds AS (
    SELECT round FROM evals
    UNION
    SELECT round FROM samples
    UNION
    SELECT round FROM decisions
),
ev AS (
    SELECT
        round,
        count(*) FILTER (WHERE split = 'test') AS eval_n,
        avg(correct::DOUBLE) FILTER (WHERE split = 'test') AS accuracy,
        count(*) FILTER (WHERE split = 'heldout') AS heldout_n,
        avg(correct::DOUBLE) FILTER (WHERE split = 'heldout') AS heldout_accuracy,
        avg(think_tokens) FILTER (WHERE split = 'test') AS mean_think_tokens,
        avg(answer_tokens) FILTER (WHERE split = 'test') AS mean_answer_tokens,
        avg(total_tokens) FILTER (WHERE split = 'test') AS mean_total_tokens,
        avg(truncated::DOUBLE) FILTER (WHERE split = 'test') AS truncation_rate
    FROM evals
    GROUP BY round
),
paired AS (
    SELECT
        e.round,
        avg(e.correct::DOUBLE - b.correct::DOUBLE) FILTER (WHERE e.split = 'test')
            AS accuracy_change,
        stddev_samp(e.correct::DOUBLE - b.correct::DOUBLE) FILTER (WHERE e.split = 'test')
            / sqrt(count(*) FILTER (WHERE e.split = 'test')) AS accuracy_change_se,
        avg(e.correct::DOUBLE - b.correct::DOUBLE) FILTER (WHERE e.split = 'heldout')
            AS heldout_accuracy_change,
        stddev_samp(e.correct::DOUBLE - b.correct::DOUBLE) FILTER (WHERE e.split = 'heldout')
            / sqrt(count(*) FILTER (WHERE e.split = 'heldout')) AS heldout_accuracy_change_se
    FROM evals AS e
    JOIN evals AS b
        ON b.round = 0
        AND b.split = e.split
        AND b.problem_id = e.problem_id
        AND b.sample_idx = e.sample_idx
    GROUP BY e.round
),
sa AS (
    SELECT
        round,
        count(*) AS samples_n,
        avg(correct::DOUBLE) AS sample_accuracy,
        avg(think_tokens) AS sample_mean_think_tokens
    FROM samples
    GROUP BY round
),
de AS (
    SELECT
        round,
        count(*) FILTER (WHERE kept) AS kept,
        count(*) FILTER (WHERE NOT kept) AS dropped,
        count(*) FILTER (WHERE NOT kept AND reason = 'wrong') AS dropped_wrong,
        count(*) FILTER (WHERE NOT kept AND reason = 'truncated') AS dropped_truncated,
        count(*) FILTER (WHERE NOT kept AND reason = 'not_shorter') AS dropped_not_shorter,
        count(*) FILTER (WHERE NOT kept AND reason = 'duplicate') AS dropped_duplicate,
        count(*) FILTER (WHERE NOT kept AND reason = 'no_answer') AS dropped_no_answer,
        count(*) FILTER (WHERE NOT kept AND reason = 'unfaithful') AS dropped_unfaithful
    FROM decisions
    GROUP BY round
),
by_reason AS (
    SELECT round, map(list(reason ORDER BY reason), list(n ORDER BY reason)) AS dropped_by_reason
    FROM (
        SELECT round, reason, count(*) AS n
        FROM decisions
        WHERE NOT kept
        GROUP BY round, reason
    )
    GROUP BY round
)
SELECT
    r.round,
    coalesce(ev.eval_n, 0) AS eval_n,
    ev.accuracy,
    coalesce(ev.heldout_n, 0) AS heldout_n,
    ev.heldout_accuracy,
    ev.mean_think_tokens,
    ev.mean_answer_tokens,
    ev.mean_total_tokens,
    ev.truncation_rate,
    paired.accuracy_change,
    paired.accuracy_change_se,
    paired.heldout_accuracy_change,
    paired.heldout_accuracy_change_se,
    ev.mean_think_tokens / (SELECT mean_think_tokens FROM ev WHERE round = 0) - 1 AS think_change,
    coalesce(sa.samples_n, 0) AS samples_n,
    sa.sample_accuracy,
    sa.sample_mean_think_tokens,
    coalesce(de.kept, 0) AS kept,
    coalesce(de.dropped, 0) AS dropped,
    coalesce(de.dropped_wrong, 0) AS dropped_wrong,
    coalesce(de.dropped_truncated, 0) AS dropped_truncated,
    coalesce(de.dropped_not_shorter, 0) AS dropped_not_shorter,
    coalesce(de.dropped_duplicate, 0) AS dropped_duplicate,
    coalesce(de.dropped_no_answer, 0) AS dropped_no_answer,
    coalesce(de.dropped_unfaithful, 0) AS dropped_unfaithful,
    coalesce(by_reason.dropped_by_reason, MAP {}::MAP(VARCHAR, BIGINT)) AS dropped_by_reason
FROM rounds AS r
LEFT JOIN ev USING (round)
LEFT JOIN paired USING (round)
LEFT JOIN sa USING (round)
LEFT JOIN de USING (round)
LEFT JOIN by_reason USING (round)
ORDER BY r.round
