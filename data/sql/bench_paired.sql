-- bench_paired: every method against mpd, seed by seed, round by round, on the same problems
-- (a bench root only). One row per (method, seed, round, split) of a method other than mpd
-- that shares the seed with an mpd member.
--
-- Why paired: both methods answered the same evaluation problems from the same starting
-- student, so the per-problem difference removes the spread of problem difficulty; its
-- standard error is what the accuracy difference of one seed can be trusted to.
--
--   n                    problems evaluated by both (the split's eval_n)
--   vs_mpd, vs_mpd_se    mean of correct(method) - correct(mpd) and its standard error,
--                        stddev(d) / sqrt(n)
--   think_vs_mpd         mean think tokens of the method minus mpd's, on those problems
SELECT
    e.method,
    e.seed,
    e.round,
    e.split,
    count(*) AS n,
    avg(e.correct::DOUBLE - m.correct::DOUBLE) AS vs_mpd,
    stddev_samp(e.correct::DOUBLE - m.correct::DOUBLE) / sqrt(count(*)) AS vs_mpd_se,
    avg(e.think_tokens - m.think_tokens) AS think_vs_mpd
FROM evals AS e
JOIN evals AS m
    ON m.method = 'mpd'
    AND m.seed = e.seed
    AND m.round = e.round
    AND m.split = e.split
    AND m.problem_id = e.problem_id
    AND m.sample_idx = e.sample_idx
WHERE e.method <> 'mpd'
GROUP BY e.method, e.seed, e.round, e.split
ORDER BY e.method, e.seed, e.round, e.split
