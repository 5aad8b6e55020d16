-- The filter's rows against the round's candidates: exactly one row per candidate, and no other.
--
-- Input:  view `decisions`  what the user's filter returned (already cast to table decisions)
--         view `candidates` problem_id, sample_idx of the round's rewrites
--         $round            the round being filtered
-- Output: one row: how many keys break each rule, and the first of them (sorted by
--         problem_id, sample_idx) so that the error can name it. tasks/filter.py reads it.
WITH counted AS (
    SELECT problem_id, sample_idx, count(*) AS n
    FROM decisions
    GROUP BY ALL
),
joined AS (
    SELECT problem_id, sample_idx, d.n, c.problem_id IS NOT NULL AS known
    FROM counted AS d
    FULL OUTER JOIN candidates AS c USING (problem_id, sample_idx)
)
SELECT
    (SELECT min(round) FROM decisions WHERE round <> $round) AS other_round,
    count(*) FILTER (WHERE n > 1) AS repeated,
    min({'problem_id': problem_id, 'sample_idx': sample_idx, 'n': n}) FILTER (WHERE n > 1)
        AS first_repeated,
    count(*) FILTER (WHERE NOT known) AS unknown,
    min({'problem_id': problem_id, 'sample_idx': sample_idx}) FILTER (WHERE NOT known)
        AS first_unknown,
    count(*) FILTER (WHERE n IS NULL) AS missing,
    min({'problem_id': problem_id, 'sample_idx': sample_idx}) FILTER (WHERE n IS NULL)
        AS first_missing,
    count(*) FILTER (WHERE known) AS candidates
FROM joined
