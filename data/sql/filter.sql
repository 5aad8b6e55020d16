-- The default MPD filter (copy this file, edit it, and point `filter.sql:` at your copy).
--
-- Input:  view `rewrites`, the current round's rewrites (table rewrites, see data/schemas.py),
--         view `samples`, the student samples they were made from (table samples).
-- Knobs:  getvariable('ratio')     keep a rewrite only if think_tokens <= ratio * the original's
--         getvariable('faithful')  keep a rewrite only if its every equation line is one the
--                                  student wrote (see `unfaithful` below)
--         getvariable('round')     the round being filtered
-- Output: one row per candidate with the columns of table `decisions`:
--         round, problem_id, sample_idx, kept, reason, think_tokens, orig_think_tokens, ratio
-- Every candidate stays as a row; a dropped one says why, in this order of precedence:
--   truncated    the rewrite hit max_tokens
--   no_answer    it finished without an answer after </think>
--   wrong        its answer is wrong
--   unfaithful   (faithful only) a line of its reasoning holding an '=' is not, verbatim, in the
--                student's trace: the teacher computed something the student did not, so a
--                right answer may sit on a wrong step (a rewrite deletes, it does not compute)
--   not_shorter  it is not shorter than ratio x the student's original
--   duplicate    another eligible rewrite of the same problem is shorter
WITH equations AS (
    SELECT
        r.problem_id,
        r.sample_idx,
        -- NULL (no check) when there is no original to compare with
        list_bool_and(list_transform(
            list_filter(
                list_transform(string_split(split_part(r.completion, '</think>', 1), chr(10)), lambda l: trim(l)),
                lambda l: contains(l, '=')
            ),
            lambda l: contains(s.completion, l)
        )) AS faithful_lines
    FROM rewrites AS r
    JOIN samples AS s USING (problem_id, sample_idx)
    -- a constant: with faithful off, DuckDB never reads the traces' text at all
    WHERE getvariable('faithful')
),
judged AS (
    SELECT
        rewrites.*,
        think_tokens::DOUBLE / greatest(orig_think_tokens, 1) AS length_ratio,
        CASE
            WHEN truncated THEN 'truncated'
            WHEN pred_answer IS NULL THEN 'no_answer'
            WHEN NOT correct THEN 'wrong'
            WHEN getvariable('faithful') AND NOT coalesce(faithful_lines, true) THEN 'unfaithful'
            WHEN think_tokens > getvariable('ratio') * orig_think_tokens THEN 'not_shorter'
        END AS drop_reason
    FROM rewrites
    LEFT JOIN equations USING (problem_id, sample_idx)
),
ranked AS (
    SELECT
        *,
        row_number() OVER (
            PARTITION BY problem_id, drop_reason IS NULL
            ORDER BY think_tokens, sample_idx
        ) AS rank_in_problem
    FROM judged
)
SELECT
    round,
    problem_id,
    sample_idx,
    drop_reason IS NULL AND rank_in_problem = 1 AS kept,
    coalesce(drop_reason, CASE WHEN rank_in_problem = 1 THEN 'kept' ELSE 'duplicate' END) AS reason,
    think_tokens,
    orig_think_tokens,
    length_ratio AS ratio
FROM ranked
ORDER BY problem_id, sample_idx
