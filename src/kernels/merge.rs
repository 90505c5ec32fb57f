//! Step 1: the union of two top-k lists, with an estimate for each unlisted token.
//!
//! Design notes. Each list is sorted by id (k ≤ a few hundred, so a sort beats hashing)
//! and the two are merge-joined, which also finds duplicate ids and leaves the
//! candidates in ascending id order — the order the inverse-CDF draw walks, mirrored by
//! the numpy reference.
use numpy::ndarray::ArrayView1;

use crate::errors::{KernelError, KernelResult};

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
        if v.is_nan() || v == f64::INFINITY {
            Err(KernelError::arg(
                "missing",
                format!("a constant must be a log probability, got {v}"),
            ))
        } else {
            Ok(Missing::Value(v))
        }
    }
}

/// One model's listed entries, sorted by id.
pub type List = Vec<(i64, f64)>;

/// Read one model's row: check it and sort it by id, skipping padding (id −1, −inf).
pub fn read_list(
    ids: ArrayView1<'_, i64>,
    logp: ArrayView1<'_, f64>,
    names: (&'static str, &'static str),
    row: usize,
    out: &mut List,
) -> KernelResult<()> {
    let (ids_name, logp_name) = names;
    out.clear();
    for (col, (&id, &lp)) in ids.iter().zip(logp.iter()).enumerate() {
        if lp.is_nan() || lp == f64::INFINITY {
            return Err(KernelError::row(
                logp_name,
                row,
                format!("column {col} is {lp}; log probabilities must be finite or -inf"),
            ));
        }
        if id == -1 {
            if lp != f64::NEG_INFINITY {
                return Err(KernelError::row(
                    ids_name,
                    row,
                    format!("column {col} is padding (id -1) but its log probability is {lp}, not -inf"),
                ));
            }
            continue;
        }
        if id < 0 {
            return Err(KernelError::row(
                ids_name,
                row,
                format!("column {col} has negative token id {id}"),
            ));
        }
        out.push((id, lp));
    }
    out.sort_unstable_by_key(|e| e.0);
    if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(KernelError::row(
            ids_name,
            row,
            format!("token id {} appears twice", w[0].0),
        ));
    }
    Ok(())
}

/// The value given to a token this list does not hold, under the `bound` rule.
pub fn bound(list: &List) -> f64 {
    let smallest = list.iter().fold(f64::INFINITY, |m, e| m.min(e.1));
    let top = list.iter().fold(f64::NEG_INFINITY, |m, e| m.max(e.1));
    let total = if top == f64::NEG_INFINITY {
        top
    } else {
        top + list.iter().map(|e| (e.1 - top).exp()).sum::<f64>().ln()
    };
    // Unlisted mass 1 − Σp, computed as −expm1(log Σp) to keep precision near 1.
    let unlisted = if total >= 0.0 {
        f64::NEG_INFINITY
    } else {
        (-total.exp_m1()).ln()
    };
    smallest.min(unlisted)
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
}

impl Merged {
    fn clear(&mut self) {
        self.ids.clear();
        self.a.clear();
        self.b.clear();
        self.obs_a.clear();
        self.obs_b.clear();
        self.no_overlap = false;
    }

    fn push(&mut self, id: i64, a: f64, b: f64, obs_a: bool, obs_b: bool) {
        self.ids.push(id);
        self.a.push(a);
        self.b.push(b);
        self.obs_a.push(obs_a);
        self.obs_b.push(obs_b);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Keep the candidates for which `keep(index, id)` holds, preserving order.
    pub fn retain(&mut self, mut keep: impl FnMut(usize, i64) -> bool) {
        let mut j = 0;
        for i in 0..self.len() {
            if keep(i, self.ids[i]) {
                self.ids[j] = self.ids[i];
                self.a[j] = self.a[i];
                self.b[j] = self.b[i];
                self.obs_a[j] = self.obs_a[i];
                self.obs_b[j] = self.obs_b[i];
                j += 1;
            }
        }
        self.ids.truncate(j);
        self.a.truncate(j);
        self.b.truncate(j);
        self.obs_a.truncate(j);
        self.obs_b.truncate(j);
    }
}

/// Merge two id-sorted lists into `out` by the `missing` rule.
pub fn merge(theta: &List, t: &List, missing: Missing, out: &mut Merged) {
    out.clear();
    let (fill_a, fill_b) = match missing {
        Missing::Value(v) => (v, v),
        Missing::Bound | Missing::Drop => (bound(theta), bound(t)),
    };
    let only_common = missing == Missing::Drop;
    let (mut i, mut j) = (0, 0);
    while i < theta.len() || j < t.len() {
        let next_a = theta.get(i).map_or(i64::MAX, |e| e.0);
        let next_b = t.get(j).map_or(i64::MAX, |e| e.0);
        if i < theta.len() && j < t.len() && next_a == next_b {
            out.push(next_a, theta[i].1, t[j].1, true, true);
            i += 1;
            j += 1;
        } else if j >= t.len() || (i < theta.len() && next_a < next_b) {
            if !only_common {
                out.push(next_a, theta[i].1, fill_b, true, false);
            }
            i += 1;
        } else {
            if !only_common {
                out.push(next_b, fill_a, t[j].1, false, true);
            }
            j += 1;
        }
    }
    if only_common && out.is_empty() && !t.is_empty() {
        for &(id, lp) in t {
            out.push(id, fill_a, lp, false, true);
        }
        out.no_overlap = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use numpy::ndarray::arr1;

    fn list(ids: &[i64], p: &[f64]) -> List {
        let mut out = List::new();
        read_list(
            arr1(ids).view(),
            arr1(&p.iter().map(|x| x.ln()).collect::<Vec<_>>()).view(),
            ("ids", "logp"),
            0,
            &mut out,
        )
        .unwrap();
        out
    }

    #[test]
    fn union_with_bound() {
        let th = list(&[5, 2, -1], &[0.5, 0.3, 0.0]);
        let t = list(&[2, 9], &[0.6, 0.1]);
        let mut m = Merged::default();
        merge(&th, &t, Missing::Bound, &mut m);
        assert_eq!(m.ids, vec![2, 5, 9]);
        assert!((m.a[2] - 0.2f64.ln()).abs() < 1e-12); // min(0.3, 1 − 0.8)
        assert!((m.b[1] - 0.1f64.ln()).abs() < 1e-12); // min(0.1, 1 − 0.7)
        assert_eq!(m.obs_a, vec![true, true, false]);
        assert_eq!(m.obs_b, vec![true, false, true]);
    }

    #[test]
    fn drop_falls_back_to_teacher() {
        let th = list(&[1], &[0.5]);
        let t = list(&[2, 3], &[0.6, 0.1]);
        let mut m = Merged::default();
        merge(&th, &t, Missing::Drop, &mut m);
        assert_eq!(m.ids, vec![2, 3]);
        assert!(m.no_overlap);
    }

    #[test]
    fn rejects_duplicates_and_bad_padding() {
        let mut out = List::new();
        let err = read_list(
            arr1(&[3, 3]).view(),
            arr1(&[-1.0, -2.0]).view(),
            ("ids", "lp"),
            4,
            &mut out,
        )
        .unwrap_err();
        assert!(err.to_string().contains("row 4"));
        assert!(read_list(arr1(&[-1]).view(), arr1(&[-1.0]).view(), ("ids", "lp"), 0, &mut out).is_err());
        assert!(read_list(arr1(&[-2]).view(), arr1(&[-1.0]).view(), ("ids", "lp"), 0, &mut out).is_err());
        assert!(read_list(arr1(&[1]).view(), arr1(&[f64::NAN]).view(), ("ids", "lp"), 0, &mut out).is_err());
    }
}
