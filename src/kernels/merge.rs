//! Step 1: the union of two top-k lists, with an estimate for each unlisted token.
//!
//! Design notes. The first version sorted both lists by id and merge-joined them; the
//! sorts were 18% of a step. Now one small open-addressing table (id → candidate slot,
//! cleared per row) finds shared ids and duplicates in a single pass over each list.
//! Candidates come out in a fixed order — the base model's list as given, then the
//! teacher-only tokens as given — which the inverse-CDF draw walks and the numpy
//! reference mirrors.
use ndarray::{ArrayView1, ArrayView2, Axis};

use crate::errors::{KernelError, KernelResult};
use crate::kernels::fastexp::exp;
use crate::kernels::logspace::{exp_shifted, sum};

/// The largest log probability accepted: raw log-softmax values are ≤ 0, and rounding in
/// the servers' float32 arithmetic can push a near-certain token a hair above 0. Anything
/// larger is a mistake (probabilities passed for log probabilities, say).
pub const MAX_LOGP: f64 = 1e-4;

/// How a token listed by one model only is valued for the other.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Missing {
    /// log min(smallest listed probability, unlisted mass): an upper bound.
    Bound,
    /// Keep only tokens both models listed.
    Drop,
    /// A constant log probability.
    Value(f64),
}

impl Missing {
    pub fn parse_name(name: &str) -> KernelResult<Self> {
        match name {
            "bound" => Ok(Missing::Bound),
            "drop" => Ok(Missing::Drop),
            other => Err(KernelError::arg(
                "missing",
                format!("unknown rule {other:?}; expected \"bound\", \"drop\" or a float log probability"),
            )),
        }
    }

    pub fn value(v: f64) -> KernelResult<Self> {
        if v.is_nan() || v > MAX_LOGP {
            Err(KernelError::arg(
                "missing",
                format!("a constant must be a log probability (<= 0), got {v}"),
            ))
        } else {
            Ok(Missing::Value(v))
        }
    }
}

/// What one pass over a list finds: whether any entry is malformed, the smallest and
/// largest listed log probability (padding excluded).
pub(crate) struct ListSummary {
    pub(crate) bad: bool,
    smallest: f64,
    largest: f64,
    pub(crate) listed: usize,
}

/// One branch-free (so vectorisable) pass over a list; `explain` describes a bad one.
#[inline(always)]
#[allow(clippy::needless_bitwise_bool)] // `|` and `&` on purpose: no branches in the loop
pub(crate) fn summarise(ids: &[i64], logp: &[f64]) -> ListSummary {
    let mut sum = ListSummary {
        bad: false,
        smallest: f64::INFINITY,
        largest: f64::NEG_INFINITY,
        listed: 0,
    };
    for (&id, &lp) in ids.iter().zip(logp) {
        let padding = id == -1;
        sum.bad |= lp.is_nan() | (lp > MAX_LOGP) | (id < -1) | (padding & (lp != f64::NEG_INFINITY));
        let listed = id >= 0;
        sum.listed += usize::from(listed);
        sum.smallest = if listed & (lp < sum.smallest) { lp } else { sum.smallest };
        sum.largest = if listed & (lp > sum.largest) { lp } else { sum.largest };
    }
    sum
}

/// Unlisted mass is taken as at least this (see `bound`).
pub const UNLISTED_MIN: f64 = 1e-12;

/// The value given to a token a list does not hold, under the `bound` rule:
/// log min(smallest listed probability, unlisted mass). `buf` is scratch.
#[inline(always)]
pub(crate) fn bound(logp: &[f64], summary: &ListSummary, buf: &mut Vec<f64>) -> f64 {
    let total = if summary.largest == f64::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        // Padding is −inf and adds nothing to the sum.
        exp_shifted(logp, summary.largest, buf);
        summary.largest + sum(buf).ln()
    };
    // Unlisted mass 1 − Σp, computed as −expm1(log Σp) to keep precision near 1, and
    // never taken below UNLISTED_MIN: below it (or at or past 1, as float32 lists from a
    // server can sum to) what remains is rounding, whose log would differ between two ways
    // of summing the same list; and a model with finite logits leaves every token some
    // mass, so the bound is never −inf.
    let unlisted = (-total.exp_m1()).max(UNLISTED_MIN).ln();
    summary.smallest.min(unlisted)
}

/// A row as a slice: borrowed when the array is contiguous, else copied into `buf`.
#[inline(always)]
pub fn row_slice<'a, T: Copy>(row: ArrayView1<'a, T>, buf: &'a mut Vec<T>) -> &'a [T] {
    if let Some(s) = row.to_slice() {
        s
    } else {
        buf.clear();
        buf.extend(row.iter().copied());
        buf
    }
}

/// Open-addressing map from token id to candidate slot, and buffers, reused across rows.
#[derive(Default)]
pub struct IdTable {
    /// (row generation, id, candidate slot); an entry from an older generation is empty,
    /// so moving to the next row costs nothing.
    entries: Vec<(u32, u32, i64)>,
    /// The merge's table: row generation << 32 | candidate slot, the id being the
    /// candidate's own (so 8 bytes an entry rather than 16: half the cache lines).
    slots: Vec<u64>,
    generation: u32,
    shift: u32,
    buf: Vec<f64>,
    buf_b: Vec<f64>,
}

impl IdTable {
    #[inline(always)]
    pub(crate) fn reset(&mut self, entries: usize) {
        // Sparse (load ≤ 1/8) keeps probe chains short: measured 1.9 → 1.5 µs per row of
        // 2 × 100 entries against load ≤ 1/2.
        let cap = (8 * entries).next_power_of_two().max(16);
        self.generation = self.generation.wrapping_add(1);
        if self.entries.len() != cap || self.generation == 0 {
            self.entries = vec![(0, 0, 0); cap];
            self.generation = 1;
            self.shift = 64 - cap.trailing_zeros();
        }
    }

    /// `reset` for `find_or_insert`'s table. At load ≤ 1/8 as `reset`; 8-byte entries
    /// (16 KB for 2 × 100 entries, against 32 KB) measured 6.0 → 5.7 µs per step row of
    /// 2 × 100, and load ≤ 1/4 (8 KB) 5.8.
    #[inline(always)]
    pub(crate) fn reset_slots(&mut self, entries: usize) {
        let cap = (8 * entries).next_power_of_two().max(16);
        self.generation = self.generation.wrapping_add(1);
        if self.slots.len() != cap || self.generation == 0 {
            self.slots = vec![0; cap];
            self.generation = 1;
            self.shift = 64 - cap.trailing_zeros();
        }
    }

    /// The slot of `id` and true, or `slot` (now reserved for `id`) and false, where
    /// `ids` holds the id of every slot handed out this row. The two outcomes leave the
    /// probe loop by one exit and come back as data (see `place`).
    #[inline(always)]
    pub(crate) fn find_or_insert(&mut self, id: i64, slot: u32, ids: &[i64]) -> (u32, bool) {
        let mask = self.slots.len() - 1;
        let tag = u64::from(self.generation) << 32;
        let mut i = ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize;
        loop {
            let e = self.slots[i & mask];
            let empty = e >> 32 != u64::from(self.generation);
            // An empty entry's slot may be an older row's, past `ids`: `get` is false there.
            let held = e as u32;
            if empty | (ids.get(held as usize) == Some(&id)) {
                let got = if empty { slot } else { held };
                // Rewrites the same entry when the id was there: a store, not a branch.
                self.slots[i & mask] = tag | u64::from(got);
                return (got, !empty);
            }
            i += 1;
        }
    }

    /// The slot of `id`, or None after reserving `slot` for it.
    #[inline(always)]
    pub(crate) fn get_or_insert(&mut self, id: i64, slot: u32) -> Option<u32> {
        let mask = self.entries.len() - 1;
        let mut i = ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize;
        loop {
            let e = &mut self.entries[i & mask];
            if e.0 != self.generation {
                *e = (self.generation, slot, id);
                return None;
            }
            if e.2 == id {
                return Some(e.1);
            }
            i += 1;
        }
    }
}

/// What `Merged::retain` shows of a candidate.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub index: usize,
    pub id: i64,
    pub obs_a: bool,
    pub obs_b: bool,
}

/// The candidate set of one row.
#[derive(Default, Debug)]
pub struct Merged {
    pub ids: Vec<i64>,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
    pub obs_a: Vec<bool>,
    pub obs_b: Vec<bool>,
    /// `drop` found no common token and kept the teacher's list.
    pub no_overlap: bool,
    /// Per candidate, exp(a − shift_a) and exp(b − shift_b), where `shift_a`/`shift_b`
    /// is Some: the exponentials the `bound` rule took of the listed log probabilities
    /// (shifted by the largest), and that of the fill value, put in candidate order. When
    /// the largest is also the maximum over the candidates (as it is under `bound`),
    /// these are the very exponentials normalising over the candidates takes, bit for
    /// bit, so `normalise_reusing` need not take them again. None when unknown or stale
    /// (a constant fill, a candidate removed).
    pub exp_a: Vec<f64>,
    pub exp_b: Vec<f64>,
    pub shift_a: Option<f64>,
    pub shift_b: Option<f64>,
}

impl Merged {
    /// Make room for `n` candidates; `len` is then the number written so far.
    fn start(&mut self, n: usize) {
        for v in [&mut self.a, &mut self.b, &mut self.exp_a, &mut self.exp_b] {
            v.clear();
            v.resize(n, 0.0);
        }
        for v in [&mut self.obs_a, &mut self.obs_b] {
            v.clear();
            v.resize(n, false);
        }
        self.ids.clear();
        self.ids.resize(n, 0);
        self.no_overlap = false;
        self.shift_a = None;
        self.shift_b = None;
    }

    /// Keep the first `n` candidates written.
    fn finish(&mut self, n: usize) {
        self.ids.truncate(n);
        self.a.truncate(n);
        self.b.truncate(n);
        self.exp_a.truncate(n);
        self.exp_b.truncate(n);
        self.obs_a.truncate(n);
        self.obs_b.truncate(n);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Keep the candidates for which `keep` holds, preserving order.
    #[inline(always)]
    pub fn retain(&mut self, mut keep: impl FnMut(Candidate) -> bool) {
        let mut j = 0;
        for i in 0..self.len() {
            let c = Candidate {
                index: i,
                id: self.ids[i],
                obs_a: self.obs_a[i],
                obs_b: self.obs_b[i],
            };
            if keep(c) {
                self.ids[j] = self.ids[i];
                self.a[j] = self.a[i];
                self.b[j] = self.b[i];
                self.obs_a[j] = self.obs_a[i];
                self.obs_b[j] = self.obs_b[i];
                j += 1;
            }
        }
        if j < self.len() {
            self.forget_exps();
        }
        self.ids.truncate(j);
        self.a.truncate(j);
        self.b.truncate(j);
        self.obs_a.truncate(j);
        self.obs_b.truncate(j);
    }

    /// Mark `exp_a` and `exp_b` stale: after the candidates or their values change.
    pub fn forget_exps(&mut self) {
        self.shift_a = None;
        self.shift_b = None;
    }
}

/// The error for the first malformed entry of a list that `summarise` found bad.
#[cold]
pub(crate) fn explain(ids: &[i64], logp: &[f64], names: (&'static str, &'static str), row: usize) -> KernelResult<()> {
    for (col, (&id, &lp)) in ids.iter().zip(logp).enumerate() {
        if lp.is_nan() || lp == f64::INFINITY {
            return Err(KernelError::row(
                names.1,
                row,
                format!("column {col} is {lp}; log probabilities must be finite or -inf"),
            ));
        }
        if lp > MAX_LOGP {
            return Err(KernelError::row(
                names.1,
                row,
                format!("column {col} is {lp}, above 0: log probabilities are <= 0 (were probabilities passed?)"),
            ));
        }
        if id == -1 && lp != f64::NEG_INFINITY {
            return Err(KernelError::row(
                names.0,
                row,
                format!("column {col} is padding (id -1) but its log probability is {lp}, not -inf"),
            ));
        }
        if id < -1 {
            return Err(KernelError::row(
                names.0,
                row,
                format!("column {col} has negative token id {id}"),
            ));
        }
    }
    Ok(())
}

/// One row of each model's list.
pub struct RowLists<'a> {
    pub ids_a: &'a [i64],
    pub lp_a: &'a [f64],
    pub ids_b: &'a [i64],
    pub lp_b: &'a [f64],
}

/// Buffers for rows that are not contiguous in memory.
#[derive(Default)]
pub struct RowBuffers {
    ids_a: Vec<i64>,
    lp_a: Vec<f64>,
    ids_b: Vec<i64>,
    lp_b: Vec<f64>,
}

impl RowBuffers {
    /// Row `r` of each array, borrowed where possible.
    #[inline(always)]
    pub fn lists<'a>(
        &'a mut self,
        arrays: (
            ArrayView2<'a, i64>,
            ArrayView2<'a, f64>,
            ArrayView2<'a, i64>,
            ArrayView2<'a, f64>,
        ),
        r: usize,
    ) -> RowLists<'a> {
        RowLists {
            ids_a: row_slice(arrays.0.index_axis_move(Axis(0), r), &mut self.ids_a),
            lp_a: row_slice(arrays.1.index_axis_move(Axis(0), r), &mut self.lp_a),
            ids_b: row_slice(arrays.2.index_axis_move(Axis(0), r), &mut self.ids_b),
            lp_b: row_slice(arrays.3.index_axis_move(Axis(0), r), &mut self.lp_b),
        }
    }
}

/// The value the `missing` rule gives a token the list lacks, and, when the rule is
/// `bound` or `drop` and the list holds a token, the largest listed log probability and
/// exp(fill − largest): `bound` has then left exp(lp − largest) of every entry in `buf`.
#[inline(always)]
fn fill_value(missing: Missing, logp: &[f64], summary: &ListSummary, buf: &mut Vec<f64>) -> (f64, Option<(f64, f64)>) {
    match missing {
        Missing::Value(v) => (v, None),
        Missing::Bound | Missing::Drop => {
            let fill = bound(logp, summary, buf);
            let largest = summary.largest;
            let exps = (largest > f64::NEG_INFINITY).then(|| (largest, exp(fill - largest)));
            (fill, exps)
        }
    }
}

/// The candidate columns `place` writes, each `ka + kb` long.
struct Columns<'a> {
    ids: &'a mut [i64],
    a: &'a mut [f64],
    b: &'a mut [f64],
    obs_a: &'a mut [bool],
    obs_b: &'a mut [bool],
    exp_a: &'a mut [f64],
    exp_b: &'a mut [f64],
}

/// Put each model's listed tokens in candidate order (the base's as given, then the
/// teacher-only ones as given) with the other model's fill where it did not list them;
/// the number of candidates. `listed_a` is how many tokens the base lists; `fill_*` is
/// (fill, exp(fill − largest), exp(lp − largest) per list entry).
///
/// A base token gets the teacher's fill at once, overwritten if the teacher lists it.
/// The teacher's shared-or-new outcome is taken as data rather than branched on (its
/// token is about as likely shared as new, so that branch was mispredicted about every
/// other entry): it writes its own columns at its slot (n when new) and its id at n,
/// which, when the token was shared, is not yet a candidate (n does not advance) and is
/// overwritten by the next new token or cut by `finish`. Slices rather than the vectors
/// themselves, so that stores to one column are not taken to move another's buffer.
#[inline(always)]
fn place(
    lists: &RowLists<'_>,
    listed_a: usize,
    (fill_a, e_fill_a, buf_a): (f64, f64, &[f64]),
    (fill_b, e_fill_b, buf_b): (f64, f64, &[f64]),
    table: &mut IdTable,
    row: usize,
    c: Columns<'_>,
) -> KernelResult<usize> {
    let Columns {
        ids,
        a,
        b,
        obs_a,
        obs_b,
        exp_a,
        exp_b,
    } = c;
    let duplicate = |arg: &'static str, id: i64| KernelError::row(arg, row, format!("token id {id} appears twice"));
    // The base's tokens. Usually its padding is all at the end, so its tokens are a
    // prefix of the list and each column is one copy or fill (rather than seven stores
    // an entry); the table then only needs the ids.
    let listed = listed_a.min(lists.ids_a.len());
    let prefix = lists.ids_a[..listed].iter().all(|&id| id >= 0);
    let mut n = 0;
    if prefix {
        ids[..listed].copy_from_slice(&lists.ids_a[..listed]);
        a[..listed].copy_from_slice(&lists.lp_a[..listed]);
        exp_a[..listed].copy_from_slice(&buf_a[..listed]);
        b[..listed].fill(fill_b);
        obs_a[..listed].fill(true);
        obs_b[..listed].fill(false);
        exp_b[..listed].fill(e_fill_b);
        for (i, &id) in lists.ids_a[..listed].iter().enumerate() {
            if table.find_or_insert(id, i as u32, ids).1 {
                return Err(duplicate("ids_theta", id));
            }
        }
        n = listed;
    } else {
        for (j, (&id, &lp)) in lists.ids_a.iter().zip(lists.lp_a).enumerate() {
            if id < 0 {
                continue;
            }
            // `ids` first: the table compares the ids of the slots it hands out.
            ids[n] = id;
            if table.find_or_insert(id, n as u32, ids).1 {
                return Err(duplicate("ids_theta", id));
            }
            a[n] = lp;
            b[n] = fill_b;
            obs_a[n] = true;
            obs_b[n] = false;
            exp_a[n] = buf_a[j];
            exp_b[n] = e_fill_b;
            n += 1;
        }
    }
    let n_a = n;
    for (j, (&id, &lp)) in lists.ids_b.iter().zip(lists.lp_b).enumerate() {
        if id < 0 {
            continue;
        }
        let (slot, shared) = table.find_or_insert(id, n as u32, ids);
        let slot = slot as usize;
        if shared & obs_b[slot] {
            return Err(duplicate("ids_t", id));
        }
        ids[n] = id;
        b[slot] = lp;
        obs_b[slot] = true;
        exp_b[slot] = buf_b[j];
        n += usize::from(!shared);
    }
    // The base's columns of the teacher-only tokens: its fill.
    a[n_a..n].fill(fill_a);
    obs_a[n_a..n].fill(false);
    exp_a[n_a..n].fill(e_fill_a);
    Ok(n)
}

/// Merge one row's two lists into `out` by the `missing` rule, checking every entry.
#[inline(always)]
pub fn merge(
    lists: &RowLists<'_>,
    missing: Missing,
    row: usize,
    table: &mut IdTable,
    out: &mut Merged,
) -> KernelResult<()> {
    let (ka, kb) = (lists.ids_a.len(), lists.ids_b.len());
    let sum_a = summarise(lists.ids_a, lists.lp_a);
    let sum_b = summarise(lists.ids_b, lists.lp_b);
    if sum_a.bad {
        explain(lists.ids_a, lists.lp_a, ("ids_theta", "logp_theta"), row)?;
    }
    if sum_b.bad {
        explain(lists.ids_b, lists.lp_b, ("ids_t", "logp_t"), row)?;
    }
    // One model with nothing listed would make every candidate look equally likely to it.
    if (sum_a.listed == 0) != (sum_b.listed == 0) {
        let (name, other) = if sum_a.listed == 0 {
            ("ids_theta", "ids_t")
        } else {
            ("ids_t", "ids_theta")
        };
        return Err(KernelError::row(
            name,
            row,
            format!("the list is empty (all padding) while {other}'s is not"),
        ));
    }
    out.start(ka + kb);
    table.reset_slots(ka + kb);
    // Both fills first: `bound` leaves the exponentials of each list in the table's
    // buffers, which `place` puts in candidate order (see `Merged::exp_a`). Where it
    // did not (a constant fill, an empty list), zeros stand in, so that `place` copies
    // without a branch; they are marked unknown below.
    let (fill_a, exps_a) = fill_value(missing, lists.lp_a, &sum_a, &mut table.buf);
    let (fill_b, exps_b) = fill_value(missing, lists.lp_b, &sum_b, &mut table.buf_b);
    for (exps, buf, k) in [(exps_a, &mut table.buf, ka), (exps_b, &mut table.buf_b, kb)] {
        if exps.is_none() {
            buf.clear();
            buf.resize(k, 0.0);
        }
    }
    // Taken out of the table (and put back below) so `place` can read them while it
    // inserts into the table.
    let (buf_a, buf_b) = (std::mem::take(&mut table.buf), std::mem::take(&mut table.buf_b));
    let Merged {
        ids,
        a,
        b,
        obs_a,
        obs_b,
        exp_a,
        exp_b,
        ..
    } = out;
    let placed = place(
        lists,
        sum_a.listed,
        (fill_a, exps_a.map_or(0.0, |e| e.1), &buf_a),
        (fill_b, exps_b.map_or(0.0, |e| e.1), &buf_b),
        table,
        row,
        Columns {
            ids,
            a,
            b,
            obs_a,
            obs_b,
            exp_a,
            exp_b,
        },
    );
    (table.buf, table.buf_b) = (buf_a, buf_b);
    out.finish(placed?);
    if let (Some((shift_a, _)), Some((shift_b, _))) = (exps_a, exps_b) {
        out.shift_a = Some(shift_a);
        out.shift_b = Some(shift_b);
    }
    if missing == Missing::Drop {
        if out.obs_a.iter().zip(&out.obs_b).any(|(&x, &y)| x && y) {
            out.retain(|c| c.obs_a && c.obs_b);
        } else if out.obs_b.iter().any(|&y| y) {
            out.retain(|c| c.obs_b);
            out.no_overlap = true;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(a: (&[i64], &[f64]), b: (&[i64], &[f64]), missing: Missing) -> KernelResult<Merged> {
        let lists = RowLists {
            ids_a: a.0,
            lp_a: a.1,
            ids_b: b.0,
            lp_b: b.1,
        };
        let mut m = Merged::default();
        merge(&lists, missing, 4, &mut IdTable::default(), &mut m)?;
        Ok(m)
    }

    fn ln(p: &[f64]) -> Vec<f64> {
        p.iter().map(|x| x.ln()).collect()
    }

    #[test]
    fn union_with_bound() {
        let m = run(
            (&[5, 2, -1], &ln(&[0.5, 0.3, 0.0])),
            (&[2, 9], &ln(&[0.6, 0.1])),
            Missing::Bound,
        )
        .unwrap();
        assert_eq!(m.ids, vec![5, 2, 9]);
        assert!((m.a[2] - 0.2f64.ln()).abs() < 1e-12); // min(0.3, 1 − 0.8)
        assert!((m.b[0] - 0.1f64.ln()).abs() < 1e-12); // min(0.1, 1 − 0.7)
        assert_eq!(m.obs_a, vec![true, true, false]);
        assert_eq!(m.obs_b, vec![false, true, true]);
    }

    #[test]
    fn drop_falls_back_to_teacher() {
        let m = run((&[1], &ln(&[0.5])), (&[2, 3], &ln(&[0.6, 0.1])), Missing::Drop).unwrap();
        assert_eq!(m.ids, vec![2, 3]);
        assert!(m.no_overlap);
        let m = run((&[1, 2], &ln(&[0.5, 0.2])), (&[2, 3], &ln(&[0.6, 0.1])), Missing::Drop).unwrap();
        assert_eq!(m.ids, vec![2]);
        assert!(!m.no_overlap);
    }

    #[test]
    fn padding_anywhere_gives_the_same_candidates() {
        use crate::kernels::logspace::{normalise_reusing, normalise_with_probs};
        let lp_a = ln(&[0.4, 0.3, 0.2]);
        let lp_b = ln(&[0.5, 0.25, 0.2, 0.01]);
        let (ninf, b) = (f64::NEG_INFINITY, (&[2i64, 9, 5, 11][..], &lp_b[..]));
        // The base's tokens as a prefix (copied column by column) and with padding
        // between them (entry by entry): the same candidates, bit for bit.
        let prefix = run((&[5, 2, 8, -1], &[lp_a[0], lp_a[1], lp_a[2], ninf]), b, Missing::Bound).unwrap();
        let middle = run((&[5, -1, 2, 8], &[lp_a[0], ninf, lp_a[1], lp_a[2]]), b, Missing::Bound).unwrap();
        assert_eq!(prefix.ids, vec![5, 2, 8, 9, 11]);
        assert_eq!(format!("{prefix:?}"), format!("{middle:?}"));
        // The exponentials the merge keeps are those normalising would take.
        for (xs, exps, shift) in [
            (&prefix.a, &prefix.exp_a, prefix.shift_a),
            (&prefix.b, &prefix.exp_b, prefix.shift_b),
        ] {
            assert!(shift.is_some());
            let (mut x1, mut x2, mut p1, mut p2) = (xs.clone(), xs.clone(), Vec::new(), Vec::new());
            let z1 = normalise_with_probs(&mut x1, &mut p1);
            let z2 = normalise_reusing(&mut x2, &mut p2, exps, shift);
            assert_eq!(z1.to_bits(), z2.to_bits());
            assert!(x1.iter().zip(&x2).all(|(u, v)| u.to_bits() == v.to_bits()));
            assert!(p1.iter().zip(&p2).all(|(u, v)| u.to_bits() == v.to_bits()));
        }
        // A constant fill above every listed value: the merge's exponentials are not used.
        let m = run(
            (&[5, 2], &ln(&[0.4, 0.3])),
            (&[2, 9], &ln(&[0.5, 0.2])),
            Missing::Value(0.0),
        )
        .unwrap();
        assert!(m.shift_a.is_none() && m.shift_b.is_none());
    }

    #[test]
    fn rejects_duplicates_on_every_path() {
        let ok = (&[7i64][..], &[-1.0][..]);
        // Base padding between tokens; a teacher-only token twice; a shared one twice.
        for (a, b, arg) in [
            (
                (&[3i64, -1, 3][..], &[-1.0, f64::NEG_INFINITY, -2.0][..]),
                ok,
                "ids_theta",
            ),
            (ok, (&[9i64, 9][..], &[-1.0, -2.0][..]), "ids_t"),
            (ok, (&[7i64, 4, 7][..], &[-1.0, -2.0, -3.0][..]), "ids_t"),
        ] {
            let err = run(a, b, Missing::Bound).unwrap_err();
            assert!(err.to_string().contains(&format!("{arg}, row 4")), "{err}");
        }
    }

    #[test]
    fn rejects_duplicates_and_bad_padding() {
        let ok = (&[7i64][..], &[-1.0][..]);
        let err = run((&[3, 3], &[-1.0, -2.0]), ok, Missing::Bound).unwrap_err();
        assert!(err.to_string().contains("ids_theta, row 4"));
        let err = run(ok, (&[3, 3], &[-1.0, -2.0]), Missing::Bound).unwrap_err();
        assert!(err.to_string().contains("ids_t, row 4"));
        assert!(run((&[-1], &[-1.0]), ok, Missing::Bound).is_err());
        assert!(run((&[-2], &[-1.0]), ok, Missing::Bound).is_err());
        assert!(run((&[1], &[f64::NAN]), ok, Missing::Bound).is_err());
    }
}
