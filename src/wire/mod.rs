//! Reading servers' replies straight into arrays: one module per wire dialect.
//!
//! Design notes. With 256 sequences and top-100 lists a reply is ~1 MB of JSON;
//! `json.loads` plus a Python loop over 25,600 entries cost ~10 ms per step, most of
//! the coordinator's time. Deserialising only the fields needed (unknown ones skipped
//! without building values) into preallocated arrays takes a fraction of that.
pub mod completions;
pub mod generate;
pub mod positions;
pub mod sglang;

use numpy::ndarray::Array2;
use serde::Deserialize;

use crate::errors::KernelError;

/// vLLM writes −inf as this; SGLang (orjson) writes it as null.
pub const NEG_INF_WIRE: f64 = -9999.0;

pub fn wire_logprob(value: Option<f64>) -> f64 {
    match value {
        Some(v) if v > NEG_INF_WIRE => v,
        _ => f64::NEG_INFINITY,
    }
}

/// vLLM's `usage`: only the prompt tokens the prefix cache served are read (present with
/// `--enable-prompt-tokens-details`).
#[derive(Deserialize)]
pub struct Usage {
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

impl Usage {
    pub fn cached_tokens(usage: Option<Usage>) -> Option<u64> {
        usage
            .and_then(|u| u.prompt_tokens_details)
            .and_then(|d| d.cached_tokens)
    }
}

/// Adds a reply's cached prompt tokens to a running total (None until one reports).
pub fn add_cached(total: &mut Option<u64>, cached: Option<u64>) {
    if let Some(c) = cached {
        *total = Some(total.unwrap_or(0) + c);
    }
}

/// A parsed reply: each row's entries, and the prompt tokens the server's prefix cache
/// served, where it says.
pub struct Parsed {
    pub ids: Array2<i64>,
    pub logp: Array2<f64>,
    pub cached_tokens: Option<u64>,
}

/// `(ids, logp)` of shape (rows, width), padded with id −1 and −inf.
pub struct TopkRows {
    pub ids: Array2<i64>,
    pub logp: Array2<f64>,
}

impl TopkRows {
    pub fn new(rows: usize, width: usize) -> Self {
        TopkRows {
            ids: Array2::from_elem((rows, width), -1i64),
            logp: Array2::from_elem((rows, width), f64::NEG_INFINITY),
        }
    }

    /// Row `r` from `(id, logprob)` entries; entries past the width are dropped.
    pub fn fill(&mut self, r: usize, entries: impl IntoIterator<Item = (i64, f64)>) {
        let width = self.ids.ncols();
        for (c, (id, lp)) in entries.into_iter().take(width).enumerate() {
            self.ids[[r, c]] = id;
            self.logp[[r, c]] = lp;
        }
    }

    pub fn finish(self, cached_tokens: Option<u64>) -> Parsed {
        Parsed {
            ids: self.ids,
            logp: self.logp,
            cached_tokens,
        }
    }
}

pub fn reply_error(msg: impl Into<String>) -> KernelError {
    KernelError::arg("reply", msg)
}
