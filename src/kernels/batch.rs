//! The building blocks on their own, batched over rows: α, q*, and the merge.
use ndarray::{Array1, Array2, ArrayView1, ArrayView2};

use crate::errors::{KernelError, KernelResult};
use crate::kernels::alpha::{self, AlphaParams, Support};
use crate::kernels::logspace::{geometric, normalise_with_probs};
use crate::kernels::merge::{bound, explain, merge, row_slice, summarise, IdTable, Merged, Missing, RowBuffers};
use crate::kernels::parallel::map_rows;
use crate::kernels::simd::with_avx2_twin;

/// Copy a row of log-weights, check it, and normalise it. Any finite level is accepted
/// here (unlike in `merge`, where the unlisted mass needs true log probabilities): α and
/// q* depend on each row only up to a constant.
#[inline(always)]
fn read_logp(
    lp: ArrayView1<'_, f64>,
    arg: &'static str,
    row: usize,
    out: &mut Vec<f64>,
    probs: &mut Vec<f64>,
) -> KernelResult<()> {
    out.clear();
    for (col, &x) in lp.iter().enumerate() {
        if x.is_nan() || x == f64::INFINITY {
            return Err(KernelError::row(
                arg,
                row,
                format!("column {col} is {x}; log probabilities must be finite or -inf"),
            ));
        }
        out.push(x);
    }
    if normalise_with_probs(out, probs) == f64::NEG_INFINITY {
        return Err(KernelError::row(
            arg,
            row,
            "every entry is -inf, so there is no distribution",
        ));
    }
    Ok(())
}

#[derive(Default)]
struct PairScratch {
    a: Vec<f64>,
    b: Vec<f64>,
    pa: Vec<f64>,
    pb: Vec<f64>,
    buf: Vec<f64>,
    support: Support,
}

#[inline(always)]
fn solve_row(
    lp_a: ArrayView1<'_, f64>,
    lp_b: ArrayView1<'_, f64>,
    p: &AlphaParams,
    r: usize,
    s: &mut PairScratch,
) -> KernelResult<(f64, u32)> {
    read_logp(lp_a, "logp_theta", r, &mut s.a, &mut s.pa)?;
    read_logp(lp_b, "logp_t", r, &mut s.b, &mut s.pb)?;
    Ok(alpha::solve_counted(&s.a, &s.b, &s.pa, &s.pb, p, &mut s.support))
}

with_avx2_twin!(solve_row_best, solve_row_avx2, solve_row, (lp_a: ArrayView1<'_, f64>, lp_b: ArrayView1<'_, f64>, p: &AlphaParams, r: usize, s: &mut PairScratch) -> KernelResult<(f64, u32)>);

pub fn solve_alpha_batch(
    lp_a: ArrayView2<'_, f64>,
    lp_b: ArrayView2<'_, f64>,
    p: &AlphaParams,
) -> KernelResult<Vec<f64>> {
    debug_assert_eq!(lp_a.dim(), lp_b.dim(), "callers check shapes");
    map_rows(lp_a.nrows(), lp_a.ncols(), |s: &mut PairScratch, r| {
        solve_row_best(lp_a.row(r), lp_b.row(r), p, r, s).map(|(alpha, _)| alpha)
    })
}

/// `solve_alpha_batch`, with each row's count of sweeps over its common support.
pub fn solve_alpha_batch_counted(
    lp_a: ArrayView2<'_, f64>,
    lp_b: ArrayView2<'_, f64>,
    p: &AlphaParams,
) -> KernelResult<Vec<(f64, u32)>> {
    debug_assert_eq!(lp_a.dim(), lp_b.dim(), "callers check shapes");
    map_rows(lp_a.nrows(), lp_a.ncols(), |s: &mut PairScratch, r| {
        solve_row_best(lp_a.row(r), lp_b.row(r), p, r, s)
    })
}

pub fn mix_batch(lp_a: ArrayView2<'_, f64>, lp_b: ArrayView2<'_, f64>, alphas: &[f64]) -> KernelResult<Array2<f64>> {
    debug_assert_eq!(lp_a.dim(), lp_b.dim(), "callers check shapes");
    if let Some((r, &a)) = alphas.iter().enumerate().find(|(_, a)| !(0.0..=1.0).contains(*a)) {
        return Err(KernelError::row("alpha", r, format!("must lie in [0, 1], got {a}")));
    }
    let rows = map_rows(lp_a.nrows(), lp_a.ncols(), |s: &mut PairScratch, r| {
        read_logp(lp_a.row(r), "logp_theta", r, &mut s.a, &mut s.pa)?;
        read_logp(lp_b.row(r), "logp_t", r, &mut s.b, &mut s.pb)?;
        let mut q: Vec<f64> =
            s.a.iter()
                .zip(&s.b)
                .map(|(&x, &y)| geometric(x, y, alphas[r]))
                .collect();
        if normalise_with_probs(&mut q, &mut s.buf) == f64::NEG_INFINITY {
            return Err(KernelError::row(
                "alpha",
                r,
                format!(
                    "the two distributions share no candidate, so q* is undefined at alpha={}",
                    alphas[r]
                ),
            ));
        }
        Ok(q)
    })?;
    let mut out = Array2::from_elem(lp_a.dim(), f64::NEG_INFINITY);
    for (mut dst, src) in out.rows_mut().into_iter().zip(&rows) {
        dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v);
    }
    Ok(out)
}

pub struct MergedBatch {
    pub ids: Array2<i64>,
    pub logp_theta: Array2<f64>,
    pub logp_t: Array2<f64>,
}

pub fn merge_batch(
    ids_a: ArrayView2<'_, i64>,
    lp_a: ArrayView2<'_, f64>,
    ids_b: ArrayView2<'_, i64>,
    lp_b: ArrayView2<'_, f64>,
    missing: Missing,
) -> KernelResult<MergedBatch> {
    let rows = map_rows(
        ids_a.nrows(),
        ids_a.ncols() + ids_b.ncols(),
        |s: &mut (IdTable, RowBuffers), r| {
            let (table, bufs) = s;
            let lists = bufs.lists((ids_a, lp_a, ids_b, lp_b), r);
            let mut m = Merged::default();
            merge(&lists, missing, r, table, &mut m)?;
            Ok(m)
        },
    )?;
    let width = rows.iter().map(Merged::len).max().unwrap_or(0);
    let mut out = MergedBatch {
        ids: Array2::from_elem((rows.len(), width), -1),
        logp_theta: Array2::from_elem((rows.len(), width), f64::NEG_INFINITY),
        logp_t: Array2::from_elem((rows.len(), width), f64::NEG_INFINITY),
    };
    for (r, m) in rows.iter().enumerate() {
        for c in 0..m.len() {
            out.ids[[r, c]] = m.ids[c];
            out.logp_theta[[r, c]] = m.a[c];
            out.logp_t[[r, c]] = m.b[c];
        }
    }
    Ok(out)
}

/// Per row, the value the `bound` rule gives a token the list does not hold (as in the
/// merge): log min(smallest listed probability, unlisted mass).
pub fn unlisted_bound_batch(ids: ArrayView2<'_, i64>, logp: ArrayView2<'_, f64>) -> KernelResult<Array1<f64>> {
    let values = map_rows(ids.nrows(), ids.ncols(), |s: &mut (Vec<i64>, Vec<f64>, Vec<f64>), r| {
        let (id_buf, lp_buf, scratch) = s;
        let row_ids = row_slice(ids.row(r), id_buf);
        let row_lp = row_slice(logp.row(r), lp_buf);
        let summary = summarise(row_ids, row_lp);
        if summary.bad {
            explain(row_ids, row_lp, ("ids", "logp"), r)?;
        }
        Ok(bound(row_lp, &summary, scratch))
    })?;
    Ok(Array1::from(values))
}
