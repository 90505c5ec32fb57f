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

use ndarray::Array2;
use serde::Deserialize;

use crate::errors::{KernelError, KernelResult};

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
    prompt_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

impl Usage {
    /// `(prompt tokens, cached prompt tokens)`, each where the reply says.
    pub fn counts(usage: Option<Usage>) -> (Option<u64>, Option<u64>) {
        match usage {
            Some(u) => (u.prompt_tokens, u.prompt_tokens_details.and_then(|d| d.cached_tokens)),
            None => (None, None),
        }
    }
}

/// What a reply must echo of its request, where the server reports it, so that a stray
/// or duplicated reply read on a kept-alive connection is an error and never data: the
/// request id (one per request, `{id}-{row}` per row where each row has its own) and
/// the prompt tokens of each row.
#[derive(Default, Clone)]
pub struct Echo {
    pub request_id: Option<String>,
    pub prompt_tokens: Option<Vec<u64>>,
}

impl Echo {
    /// The reply's id against the one sent (`row`: the id of that row, `{id}-{row}`).
    pub fn check_id(&self, row: Option<usize>, got: Option<&str>) -> KernelResult<()> {
        let (Some(base), Some(got)) = (self.request_id.as_deref(), got) else {
            return Ok(());
        };
        let want = match row {
            Some(r) => format!("{base}-{r}"),
            None => base.to_string(),
        };
        if echoes(got, &want) {
            Ok(())
        } else {
            Err(mismatch(format!(
                "a reply to another request (its id is {got:?}, the request's {want:?}): discarded"
            )))
        }
    }

    /// The prompt tokens the reply counts for rows `rows` against those sent.
    pub fn check_prompt(&self, rows: std::ops::Range<usize>, got: Option<u64>) -> KernelResult<()> {
        let (Some(sent), Some(got)) = (self.prompt_tokens.as_deref(), got) else {
            return Ok(());
        };
        let want: u64 = sent.get(rows.clone()).map_or(0, |s| s.iter().sum());
        if sent.len() < rows.end || got == want {
            Ok(())
        } else {
            Err(mismatch(format!(
                "a reply to another request ({got} prompt tokens, the request sent {want} in rows {rows:?}): discarded"
            )))
        }
    }
}

/// `want` within `got` as a whole `-`-separated part (servers add prefixes such as
/// `cmpl-` and may add suffixes; `x-1` must not match `x-10`).
fn echoes(got: &str, want: &str) -> bool {
    let bytes = got.as_bytes();
    got.match_indices(want).any(|(i, _)| {
        let end = i + want.len();
        (i == 0 || bytes[i - 1] == b'-') && (end == bytes.len() || bytes[end] == b'-')
    })
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

/// A well-formed reply that lacks what was asked for: not retried (asking again gets
/// the same answer).
pub fn reply_error(msg: impl Into<String>) -> KernelError {
    KernelError::Incomplete { msg: msg.into() }
}

/// A body that does not read as the reply: torn or not JSON (retried, it may be a broken
/// transfer), or JSON of another shape (not retried).
pub fn json_error(what: &str, err: &serde_json::Error) -> KernelError {
    let msg = format!("{what}: {err}");
    if err.is_data() {
        KernelError::Incomplete { msg }
    } else {
        KernelError::Reply { msg }
    }
}

fn mismatch(msg: String) -> KernelError {
    KernelError::Mismatch { msg }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_ids_match_as_whole_parts() {
        assert!(echoes("cmpl-ab12-3", "ab12-3"));
        assert!(echoes("ab12-3", "ab12-3"));
        assert!(echoes("ab12-3-0f9e", "ab12-3"));
        assert!(!echoes("ab12-30", "ab12-3"));
        assert!(!echoes("xab12-3", "ab12-3"));
        let echo = Echo {
            request_id: Some("ab".into()),
            prompt_tokens: Some(vec![3, 4]),
        };
        assert!(echo.check_id(Some(1), Some("ab-1")).is_ok());
        assert!(echo.check_id(Some(1), Some("ab-0")).is_err());
        assert!(echo.check_id(None, None).is_ok());
        assert!(echo.check_prompt(0..2, Some(7)).is_ok());
        assert!(echo.check_prompt(1..2, Some(3)).is_err());
        assert!(echo.check_prompt(0..2, None).is_ok());
        assert!(Echo::default().check_id(Some(0), Some("zz")).is_ok());
    }
}
