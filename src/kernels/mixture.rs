//! Several teachers as one: the weighted geometric mean of their top-k lists, which the
//! two-model step then takes as its teacher (docs/design.md, section 1.4.1).
//!
//! Why that is the mixture asked for. With weights w_i ≥ 0, Σ w_i = 1, and a total
//! teacher weight a,
//!
//! ```text
//! π_θ^(1−a) · Π_i π_i^(a·w_i) = π_θ^(1−a) · (Π_i π_i^(w_i))^a = π_θ^(1−a) · (Z_w·π_w)^a
//! ```
//!
//! where π_w = Π π_i^(w_i) / Z_w is the normalised geometric mean. Z_w^a is a constant, so
//! it cancels when q* is normalised: q* ∝ π_θ^(1−a) π_w^a is the two-model geometric path
//! between π_θ and π_w, with α_i = a·w_i. The run's α rule therefore applies to (π_θ, π_w)
//! unchanged, and `kl_symmetry` picks the Chernoff point KL(q‖π_θ) = KL(q‖π_w) between the
//! base and the mixed teacher. (Taking the α rule to π_w unnormalised would not: KL(q‖·)
//! shifts by log Z_w. The step normalises each model over its candidates, so it never is.)
//!
//! Design notes.
//! - The values returned are Σ w_i log π_i, not renormalised. The step normalises the
//!   teacher over its candidates (step 4), which is where log Z_w goes; normalising here
//!   as well would change nothing on these ids, but would make the list claim all of the
//!   teacher's mass, so the step's `bound` rule would value every token only the base
//!   listed at the 1e-12 floor. Unnormalised, 1 − Σ exp(Σ w_i log π_i) over the union is
//!   an upper bound on the rest of the geometric mean's mass (Σ over all tokens of
//!   Π π_i^(w_i) is Z_w ≤ 1, by the weighted AM–GM inequality), as a raw list's is.
//! - No temperature here: the step divides the mixed list by `temperature_t`, once.
//!   (Σ w_i log π_i)/τ = Σ w_i (log π_i / τ), so that is each teacher tempered and then
//!   mixed, with the `missing` values found on the raw lists and tempered with them, as
//!   the two-model step treats a token the teacher did not list.
//! - A token one teacher did not list but another did gets, for that teacher, the value
//!   the `missing` rule gives in the merge (`bound`: log min(smallest listed probability,
//!   unlisted mass) of that teacher's raw list; a constant as is). `drop` keeps the tokens
//!   every teacher with positive weight listed; when they share none, the union is kept
//!   with the `bound` values (as the merge keeps the teacher's list when base and teacher
//!   share none). A teacher at weight 0 takes no part: its ids do not join the union.
//! - Output columns come in blocks, one per teacher in order: teacher i's column c goes
//!   to column Σ_{j<i} k_j + c, and an id an earlier teacher listed leaves padding there.
//!   One teacher at weight 1 then comes back exactly as given (1·x = x, −0.0 + x = x, and
//!   every column in place, so the step's sums see the same lanes), and the step gives
//!   bitwise the two-model result.
use ndarray::{Array2, ArrayView2};

use crate::errors::{KernelError, KernelResult};
use crate::kernels::merge::{bound, explain, summarise, IdTable, Missing, MAX_LOGP};
use crate::kernels::parallel::map_rows;

/// How far Σ w_i may be from 1: room for the rounding of weights such as 1/3 each.
pub const WEIGHT_SUM_TOL: f64 = 1e-9;

/// The weights among the teachers, checked: one per teacher, finite, ≥ 0, summing to 1.
#[derive(Clone, Debug, PartialEq)]
pub struct MixWeights(Vec<f64>);

impl MixWeights {
    pub fn new(weights: Vec<f64>, teachers: usize) -> KernelResult<Self> {
        if teachers == 0 {
            return Err(KernelError::arg("ids_list", "at least one teacher is needed"));
        }
        if weights.len() != teachers {
            return Err(KernelError::arg(
                "weights",
                format!("expected one weight per teacher ({teachers}), got {}", weights.len()),
            ));
        }
        if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
            return Err(KernelError::arg(
                "weights",
                format!("weight {i} is {w}; weights must be finite and >= 0"),
            ));
        }
        let total: f64 = weights.iter().sum();
        if (total - 1.0).abs() > WEIGHT_SUM_TOL {
            return Err(KernelError::arg("weights", format!("must sum to 1, got {total}")));
        }
        Ok(MixWeights(weights))
    }

    pub fn as_slice(&self) -> &[f64] {
        &self.0
    }
}

/// One teacher's list for one row: ids (-1 is padding) and raw log probabilities.
#[derive(Clone, Copy)]
pub struct TeacherRow<'a> {
    pub ids: &'a [i64],
    pub logp: &'a [f64],
}

/// Buffers reused across the rows one worker handles.
#[derive(Default)]
pub struct MixScratch {
    table: IdTable,
    buf: Vec<f64>,
    /// Per token of the union: its id and output column.
    entries: Vec<(i64, usize)>,
    /// values[u·n + i]: teacher i's listed log probability of token u; NaN if unlisted
    /// (a listed value is never NaN: `summarise` refuses it).
    values: Vec<f64>,
    fills: Vec<f64>,
    listed: Vec<usize>,
}

/// `err` with the teacher's index in front of its message.
fn for_teacher(err: KernelError, i: usize) -> KernelError {
    match err {
        KernelError::Input { arg, row, msg } => KernelError::Input {
            arg,
            row,
            msg: format!("teacher {i}: {msg}"),
        },
        other => other,
    }
}

/// Check every teacher's list and find each one's `missing` value.
fn check_lists(
    teachers: &[TeacherRow<'_>],
    w: &[f64],
    missing: Missing,
    row: usize,
    s: &mut MixScratch,
) -> KernelResult<()> {
    s.fills.clear();
    s.listed.clear();
    for (i, t) in teachers.iter().enumerate() {
        let summary = summarise(t.ids, t.logp);
        if summary.bad {
            explain(t.ids, t.logp, ("ids_list", "logp_list"), row).map_err(|e| for_teacher(e, i))?;
        }
        s.listed.push(summary.listed);
        s.fills.push(match missing {
            Missing::Value(v) => v,
            Missing::Bound | Missing::Drop => bound(t.logp, &summary, &mut s.buf),
        });
    }
    // A teacher listing nothing would make every token look equally likely to it.
    let active = || (0..teachers.len()).filter(|&i| w[i] > 0.0);
    if let (Some(empty), Some(full)) = (
        active().find(|&i| s.listed[i] == 0),
        active().find(|&i| s.listed[i] > 0),
    ) {
        return Err(KernelError::row(
            "ids_list",
            row,
            format!("teacher {empty}'s list is empty (all padding) while teacher {full}'s is not"),
        ));
    }
    Ok(())
}

/// Gather the union of the lists of the teachers with positive weight into `s.entries`
/// and `s.values`, refusing an id listed twice by one teacher.
fn gather(teachers: &[TeacherRow<'_>], w: &[f64], row: usize, s: &mut MixScratch) -> KernelResult<()> {
    let n = teachers.len();
    let width: usize = teachers.iter().map(|t| t.ids.len()).sum();
    s.table.reset(width);
    s.entries.clear();
    s.values.clear();
    let mut offset = 0;
    for (i, t) in teachers.iter().enumerate() {
        if w[i] > 0.0 {
            for (c, (&id, &lp)) in t.ids.iter().zip(t.logp).enumerate() {
                if id < 0 {
                    continue;
                }
                let u = if let Some(u) = s.table.get_or_insert(id, s.entries.len() as u32) {
                    u as usize
                } else {
                    s.entries.push((id, offset + c));
                    s.values.resize(s.values.len() + n, f64::NAN);
                    s.entries.len() - 1
                };
                let v = &mut s.values[u * n + i];
                if !v.is_nan() {
                    return Err(KernelError::row(
                        "ids_list",
                        row,
                        format!("teacher {i}: token id {id} appears twice"),
                    ));
                }
                *v = lp;
            }
        }
        offset += t.ids.len();
    }
    Ok(())
}

/// One row: the mixed teacher's list written into `out_ids`/`out_logp` (of width Σ k_i,
/// filled with -1/-inf by the caller), log weights Σ w_i log π_i (see the module notes).
pub fn mix_row(
    teachers: &[TeacherRow<'_>],
    weights: &MixWeights,
    missing: Missing,
    row: usize,
    s: &mut MixScratch,
    out_ids: &mut [i64],
    out_logp: &mut [f64],
) -> KernelResult<()> {
    let w = weights.as_slice();
    debug_assert_eq!(w.len(), teachers.len(), "callers check the counts");
    check_lists(teachers, w, missing, row, s)?;
    gather(teachers, w, row, s)?;
    let n = teachers.len();
    let active = (0..n).filter(|&i| w[i] > 0.0).count();
    let listed_by_all = |u: usize| s.values[u * n..(u + 1) * n].iter().filter(|v| !v.is_nan()).count() == active;
    // `drop` keeps the common tokens; with none, the union (the fills are `bound`'s).
    let only_common = missing == Missing::Drop && (0..s.entries.len()).any(listed_by_all);
    for (u, &(id, col)) in s.entries.iter().enumerate() {
        if only_common && !listed_by_all(u) {
            continue;
        }
        // −0.0 is the additive identity (0.0 + −0.0 would be 0.0), and the teachers are
        // summed in order, so one teacher at weight 1 gives its value bit for bit.
        let mut acc = -0.0;
        for i in (0..n).filter(|&i| w[i] > 0.0) {
            let v = s.values[u * n + i];
            acc += w[i] * if v.is_nan() { s.fills[i] } else { v };
        }
        out_ids[col] = id;
        // Weights summing to 1 + 1e-9 could lift values at the ceiling a hair past it.
        out_logp[col] = if acc > MAX_LOGP { MAX_LOGP } else { acc };
    }
    Ok(())
}

/// The mixed teacher's list for every row: (ids, log weights), each of shape
/// (rows, Σ k_i), padded with -1/-inf. `ids[i]` and `logp[i]` are teacher i's arrays.
pub fn mix_teachers_batch(
    ids: &[ArrayView2<'_, i64>],
    logp: &[ArrayView2<'_, f64>],
    weights: &MixWeights,
    missing: Missing,
) -> KernelResult<(Array2<i64>, Array2<f64>)> {
    let n = weights.as_slice().len();
    if ids.len() != n || logp.len() != n {
        return Err(KernelError::arg(
            "logp_list",
            format!(
                "expected one array per teacher ({n}) in ids_list and logp_list, got {} and {}",
                ids.len(),
                logp.len()
            ),
        ));
    }
    let rows = ids[0].nrows();
    for (i, (a, b)) in ids.iter().zip(logp).enumerate() {
        if a.dim() != b.dim() {
            return Err(KernelError::arg(
                "logp_list",
                format!(
                    "teacher {i}: shape {:?} does not match ids_list's {:?}",
                    b.shape(),
                    a.shape()
                ),
            ));
        }
        if a.nrows() != rows {
            return Err(KernelError::arg(
                "ids_list",
                format!("teacher {i} has {} rows but teacher 0 has {rows}", a.nrows()),
            ));
        }
    }
    // Row-major copies where needed, so that every row is a slice.
    let ids: Vec<_> = ids.iter().map(|a| a.as_standard_layout()).collect();
    let logp: Vec<_> = logp.iter().map(|a| a.as_standard_layout()).collect();
    let width: usize = ids.iter().map(ndarray::ArrayBase::ncols).sum();
    let mixed = map_rows(rows, width, |s: &mut MixScratch, r| {
        let teachers: Vec<TeacherRow<'_>> = ids
            .iter()
            .zip(&logp)
            .map(|(a, b)| TeacherRow {
                ids: a.row(r).to_slice().expect("standard layout"),
                logp: b.row(r).to_slice().expect("standard layout"),
            })
            .collect();
        let mut out = (vec![-1; width], vec![f64::NEG_INFINITY; width]);
        mix_row(&teachers, weights, missing, r, s, &mut out.0, &mut out.1)?;
        Ok(out)
    })?;
    let mut out_ids = Array2::from_elem((rows, width), -1);
    let mut out_logp = Array2::from_elem((rows, width), f64::NEG_INFINITY);
    for (r, (i, l)) in mixed.iter().enumerate() {
        out_ids.row_mut(r).iter_mut().zip(i).for_each(|(d, &v)| *d = v);
        out_logp.row_mut(r).iter_mut().zip(l).for_each(|(d, &v)| *d = v);
    }
    Ok((out_ids, out_logp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::step::{step_batch, Batch, StepConfig};
    use ndarray::{arr2, Array2};

    fn ln(p: &[f64]) -> Vec<f64> {
        p.iter().map(|x| x.ln()).collect()
    }

    fn weights(w: &[f64]) -> MixWeights {
        MixWeights::new(w.to_vec(), w.len()).unwrap()
    }

    fn one_row(lists: &[(&[i64], &[f64])], w: &[f64], missing: Missing) -> KernelResult<(Vec<i64>, Vec<f64>)> {
        let teachers: Vec<TeacherRow<'_>> = lists.iter().map(|&(ids, logp)| TeacherRow { ids, logp }).collect();
        let width = lists.iter().map(|l| l.0.len()).sum();
        let mut out = (vec![-1; width], vec![f64::NEG_INFINITY; width]);
        mix_row(
            &teachers,
            &weights(w),
            missing,
            3,
            &mut MixScratch::default(),
            &mut out.0,
            &mut out.1,
        )?;
        Ok(out)
    }

    #[test]
    fn weights_are_checked_by_name() {
        for (w, n) in [
            (vec![0.5, 0.6], 2),
            (vec![1.5, -0.5], 2),
            (vec![f64::NAN, 1.0], 2),
            (vec![1.0], 2),
            (vec![], 0),
        ] {
            let err = MixWeights::new(w.clone(), n).unwrap_err().to_string();
            assert!(
                err.starts_with("weights: ") || err.starts_with("ids_list: "),
                "{w:?}: {err}"
            );
        }
        assert!(MixWeights::new(vec![1.0 / 3.0; 3], 3).is_ok());
        assert!(MixWeights::new(vec![1.0, 0.0], 2).is_ok());
    }

    #[test]
    fn union_is_the_weighted_sum_with_fills() {
        // Teacher 0 lists 5 and 2, teacher 1 lists 2 and 9; the constant rule fills -10.
        let (ids, lp) = one_row(
            &[
                (&[5, 2], &ln(&[0.5, 0.3])),
                (&[2, 9, -1], &[0.6f64.ln(), 0.1f64.ln(), f64::NEG_INFINITY]),
            ],
            &[0.25, 0.75],
            Missing::Value(-10.0),
        )
        .unwrap();
        assert_eq!(ids, vec![5, 2, -1, 9, -1]);
        let expect = [
            0.25 * 0.5f64.ln() + 0.75 * -10.0,
            0.25 * 0.3f64.ln() + 0.75 * 0.6f64.ln(),
            f64::NEG_INFINITY,
            0.25 * -10.0 + 0.75 * 0.1f64.ln(),
            f64::NEG_INFINITY,
        ];
        for (x, y) in lp.iter().zip(expect) {
            assert!(x == &y || (x - y).abs() < 1e-14, "{lp:?}");
        }
    }

    #[test]
    fn bound_and_drop_follow_the_merge() {
        let a: (&[i64], &[f64]) = (&[5, 2], &ln(&[0.5, 0.3]));
        let b: (&[i64], &[f64]) = (&[2, 9], &ln(&[0.6, 0.1]));
        let (ids, lp) = one_row(&[a, b], &[0.5, 0.5], Missing::Bound).unwrap();
        assert_eq!(ids, vec![5, 2, -1, 9]);
        // bound of teacher 1 is min(0.1, 1 − 0.7), of teacher 0 min(0.3, 1 − 0.8)
        assert!((lp[0] - 0.5 * (0.5f64.ln() + 0.1f64.ln())).abs() < 1e-12);
        assert!((lp[3] - 0.5 * (0.2f64.ln() + 0.1f64.ln())).abs() < 1e-12);
        let (ids, _) = one_row(&[a, b], &[0.5, 0.5], Missing::Drop).unwrap();
        assert_eq!(ids, vec![-1, 2, -1, -1]);
        // No common token: the union with the bound values.
        let c: (&[i64], &[f64]) = (&[7], &ln(&[0.9]));
        let (ids, lp) = one_row(&[a, c], &[0.5, 0.5], Missing::Drop).unwrap();
        let (ids_b, lp_b) = one_row(&[a, c], &[0.5, 0.5], Missing::Bound).unwrap();
        assert_eq!((ids, lp), (ids_b, lp_b));
    }

    #[test]
    fn zero_weight_teacher_takes_no_part() {
        let (ids, lp) = one_row(
            &[(&[5, 2], &ln(&[0.5, 0.3])), (&[2, 9], &ln(&[0.6, 0.1]))],
            &[1.0, 0.0],
            Missing::Bound,
        )
        .unwrap();
        assert_eq!(ids, vec![5, 2, -1, -1]);
        assert_eq!(&lp[..2], &ln(&[0.5, 0.3])[..]);
    }

    #[test]
    fn errors_name_the_list_and_teacher() {
        let ok: (&[i64], &[f64]) = (&[1], &[-1.0]);
        let err = one_row(&[ok, (&[3, 3], &[-1.0, -2.0])], &[0.5, 0.5], Missing::Bound).unwrap_err();
        assert_eq!(err.to_string(), "ids_list, row 3: teacher 1: token id 3 appears twice");
        let err = one_row(&[ok, (&[3], &[f64::NAN])], &[0.5, 0.5], Missing::Bound).unwrap_err();
        assert!(
            err.to_string().starts_with("logp_list, row 3: teacher 1: column 0"),
            "{err}"
        );
        let err = one_row(&[ok, (&[-1], &[f64::NEG_INFINITY])], &[0.5, 0.5], Missing::Bound).unwrap_err();
        assert!(err.to_string().contains("teacher 1's list is empty"), "{err}");
        // An empty list at weight 0 is no one's concern.
        assert!(one_row(&[ok, (&[-1], &[f64::NEG_INFINITY])], &[1.0, 0.0], Missing::Bound).is_ok());
    }

    #[test]
    fn one_teacher_at_weight_one_is_the_two_model_step_bitwise() {
        let ids_a = arr2(&[[4i64, 1, 7, -1], [0, 1, 2, 3]]);
        let lp_a = arr2(&[
            [0.4f64.ln(), 0.3f64.ln(), 0.1f64.ln(), f64::NEG_INFINITY],
            [0.25f64.ln(), 0.25f64.ln(), 0.25f64.ln(), 0.2f64.ln()],
        ]);
        let ids_t = arr2(&[[1i64, 9, -1], [3, 5, 0]]);
        // -0.0 (a certain token, as a server may write it) must come back as -0.0.
        let lp_t = arr2(&[
            [-0.0, 0.2f64.ln(), f64::NEG_INFINITY],
            [0.5f64.ln(), 0.3f64.ln(), 0.1f64.ln()],
        ]);
        let (mi, ml) = mix_teachers_batch(&[ids_t.view()], &[lp_t.view()], &weights(&[1.0]), Missing::Bound).unwrap();
        assert_eq!(mi, ids_t);
        assert!(ml.iter().zip(lp_t.iter()).all(|(x, y)| x.to_bits() == y.to_bits()));
        for cfg in [
            StepConfig::default(),
            StepConfig {
                temperature: 0.7,
                temperature_t: 1.3,
                missing: Missing::Drop,
                ..StepConfig::default()
            },
        ] {
            let run = |ids_t: &Array2<i64>, lp_t: &Array2<f64>| {
                let batch = Batch {
                    ids_theta: ids_a.view(),
                    logp_theta: lp_a.view(),
                    ids_t: ids_t.view(),
                    logp_t: lp_t.view(),
                    row_keys: &[0, 1],
                    positions: &[5, 5],
                    force_teacher: &[false, false],
                    drafts: &[],
                    seed: 9,
                };
                step_batch(&batch, &cfg).unwrap()
            };
            let (x, y) = (run(&ids_t, &lp_t), run(&mi, &ml));
            for (p, q) in x.iter().zip(&y) {
                assert_eq!(p.token_id, q.token_id);
                assert_eq!(p.alpha.to_bits(), q.alpha.to_bits());
                assert_eq!(p.logq.to_bits(), q.logq.to_bits());
                assert_eq!(p.logp_t.to_bits(), q.logp_t.to_bits());
            }
        }
    }

    #[test]
    fn batch_checks_shapes() {
        let ids = arr2(&[[1i64, 2]]);
        let lp = arr2(&[[-1.0, -2.0]]);
        let short = arr2(&[[-1.0]]);
        let w = weights(&[0.5, 0.5]);
        let err = mix_teachers_batch(
            &[ids.view(), ids.view()],
            &[lp.view(), short.view()],
            &w,
            Missing::Bound,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("logp_list: teacher 1"), "{err}");
        let two = arr2(&[[1i64, 2], [1, 2]]);
        let lp2 = arr2(&[[-1.0, -2.0], [-1.0, -2.0]]);
        let err =
            mix_teachers_batch(&[ids.view(), two.view()], &[lp.view(), lp2.view()], &w, Missing::Bound).unwrap_err();
        assert!(err.to_string().starts_with("ids_list: teacher 1 has 2 rows"), "{err}");
    }
}
