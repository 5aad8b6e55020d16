-- self_train's selection: per problem, the student's own shortest correct sample.
--
-- Input:  view `samples`, one round's student samples (table samples, data/schemas.py): n per
--         problem (sample.n >= 4 for self_train, so that a short correct one is likely there).
-- Output: at most one row per problem, the columns of `samples`, in problem order:
--         the correct, untruncated sample with the fewest think tokens (ties: fewer total
--         tokens, then the lower sample_idx). A problem with no correct sample has no row.
--
-- "Shortest" counts think tokens, as the filter and the bench do: what is being compressed is
-- the reasoning, and the answer after </think> is the same few tokens either way.
SELECT * EXCLUDE (rank_in_problem)
FROM (
    SELECT
        *,
        row_number() OVER (
            PARTITION BY problem_id
            ORDER BY think_tokens, total_tokens, sample_idx
        ) AS rank_in_problem
    FROM samples
    WHERE correct AND NOT truncated
)
WHERE rank_in_problem = 1
ORDER BY problem_id
