//! Running a per-row kernel over a batch, in parallel when the batch is big enough.
//!
//! Design notes. Rows are independent, so rayon's work stealing over row indices is all
//! that is needed; each worker owns one scratch value (`map_init`), so the hot loop does
//! not allocate. Below `PARALLEL_MIN_WORK` (rows × entries per row) the thread hand-off
//! costs more than it saves, so small batches run on the calling thread. Measured with
//! `step` on 2 cores: 64 rows × 100 entries 325 µs either way, 128 × 100 681 → 411 µs,
//! 512 × 20 770 → 460-500 µs. Errors are reported for the lowest failing row whatever
//! the scheduling.
use rayon::prelude::*;

use crate::errors::KernelResult;

const PARALLEL_MIN_WORK: usize = 16 * 1024;

pub fn map_rows<T, S, F>(rows: usize, entries_per_row: usize, f: F) -> KernelResult<Vec<T>>
where
    T: Send,
    S: Default,
    F: Fn(&mut S, usize) -> KernelResult<T> + Sync,
{
    if rows.saturating_mul(entries_per_row.max(1)) < PARALLEL_MIN_WORK || rayon::current_num_threads() == 1 {
        let mut scratch = S::default();
        return (0..rows).map(|r| f(&mut scratch, r)).collect();
    }
    let results: Vec<KernelResult<T>> = (0..rows)
        .into_par_iter()
        .with_min_len(4)
        .map_init(S::default, |s, r| f(s, r))
        .collect();
    results.into_iter().collect()
}

/// `map_rows`, with `out` cut into one chunk of `per_row` entries per row that `f`
/// fills for its row (so per-row results of any width need no allocation per row).
pub fn map_rows_into<T, E, S, F>(
    rows: usize,
    entries_per_row: usize,
    per_row: usize,
    out: &mut [E],
    f: F,
) -> KernelResult<Vec<T>>
where
    T: Send,
    E: Send,
    S: Default,
    F: Fn(&mut S, usize, &mut [E]) -> KernelResult<T> + Sync,
{
    if per_row == 0 {
        return map_rows(rows, entries_per_row, |s, r| f(s, r, &mut []));
    }
    debug_assert_eq!(out.len(), rows * per_row);
    if rows.saturating_mul(entries_per_row.max(1)) < PARALLEL_MIN_WORK || rayon::current_num_threads() == 1 {
        let mut scratch = S::default();
        return out
            .chunks_mut(per_row)
            .enumerate()
            .map(|(r, chunk)| f(&mut scratch, r, chunk))
            .collect();
    }
    let results: Vec<KernelResult<T>> = out
        .par_chunks_mut(per_row)
        .enumerate()
        .with_min_len(4)
        .map_init(S::default, |s, (r, chunk)| f(s, r, chunk))
        .collect();
    results.into_iter().collect()
}
