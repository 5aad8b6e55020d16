-- bench: one row per (method, seed, round, split), the table `mpd bench` writes to bench.parquet.
--
-- Defined only in a bench root (a directory with bench.json), whose tables stack every member
-- workspace's with `method` and `seed` columns. Everything here comes from those tables, so
-- `mpd sql -w runs/bench "select * from bench"` and bench.parquet always agree.
--
--   eval_n, accuracy                       evals rows of the split, mean of `correct`
--   mean_think_tokens, mean_answer_tokens, mean_total_tokens, truncation_rate
--   accuracy_change                        accuracy − round 0's (same method, seed, split)
--   accuracy_change_se                     its standard error, paired by problem (round 0
--                                          answered the same problems): stddev(d) / sqrt(n)
--   tokens_change, think_change            mean total (think) tokens / round 0's − 1
--   train_steps, train_tokens              the round's optimizer steps and the target tokens
--                                          they trained on (train_log); 0 for round 0
--   wall_s                                 the round's stage durations summed (manifests):
--                                          what the round costs, also when its stages were
--                                          shared from another method's workspace
--
-- Round 0 is the starting student, the same for every method of a seed.
WITH ev AS (
    SELECT
        method,
        seed,
        round,
        split,
        count(*) AS eval_n,
        avg(correct::DOUBLE) AS accuracy,
        avg(think_tokens) AS mean_think_tokens,
        avg(answer_tokens) AS mean_answer_tokens,
        avg(total_tokens) AS mean_total_tokens,
        avg(truncated::DOUBLE) AS truncation_rate
    FROM evals
    GROUP BY method, seed, round, split
),
base AS (
    SELECT
        method,
        seed,
        split,
        accuracy AS accuracy0,
        mean_total_tokens AS total0,
        mean_think_tokens AS think0
    FROM ev
    WHERE round = 0
),
tr AS (
    SELECT method, seed, round, count(*) AS train_steps, sum(tokens)::BIGINT AS train_tokens
    FROM train_log
    GROUP BY method, seed, round
),
paired AS (
    SELECT
        e.method,
        e.seed,
        e.round,
        e.split,
        stddev_samp(e.correct::DOUBLE - b.correct::DOUBLE) / sqrt(count(*)) AS accuracy_change_se
    FROM evals AS e
    JOIN evals AS b
        ON b.round = 0
        AND b.method = e.method
        AND b.seed = e.seed
        AND b.split = e.split
        AND b.problem_id = e.problem_id
        AND b.sample_idx = e.sample_idx
    GROUP BY e.method, e.seed, e.round, e.split
),
wall AS (
    SELECT method, seed, round, sum(duration_s) AS wall_s
    FROM stage_runs
    WHERE stage NOT IN ('problems', 'bootstrap')
    GROUP BY method, seed, round
)
SELECT
    ev.method,
    ev.seed,
    ev.round,
    ev.split,
    ev.eval_n,
    ev.accuracy,
    ev.accuracy - base.accuracy0 AS accuracy_change,
    paired.accuracy_change_se,
    ev.mean_think_tokens,
    ev.mean_answer_tokens,
    ev.mean_total_tokens,
    ev.mean_total_tokens / nullif(base.total0, 0) - 1 AS tokens_change,
    ev.mean_think_tokens / nullif(base.think0, 0) - 1 AS think_change,
    ev.truncation_rate,
    coalesce(tr.train_steps, 0) AS train_steps,
    coalesce(tr.train_tokens, 0) AS train_tokens,
    wall.wall_s
FROM ev
LEFT JOIN base USING (method, seed, split)
LEFT JOIN paired USING (method, seed, round, split)
LEFT JOIN tr USING (method, seed, round)
LEFT JOIN wall USING (method, seed, round)
ORDER BY ev.method, ev.seed, ev.round, ev.split
