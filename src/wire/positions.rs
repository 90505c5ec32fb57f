//! Replies with several positions per sequence, for speculative rounds: a draft (the
//! generated tokens and the top-k at each) or the scoring of a given continuation.
//! Every position becomes one row; `lengths` says how many rows each sequence has.
//! vLLM's are read in `generate`, with that module's reply types; SGLang's here.
use ndarray::Array2;
use serde::Deserialize;

use super::sglang::{Field, Triple};
use super::{add_cached, json_error, reply_error, Echo};
use crate::errors::KernelResult;

/// Rows for every position of every sequence of a reply.
pub struct Positions {
    /// The token at each row's position (the sampled or replayed one).
    pub tokens: Vec<i64>,
    pub ids: Array2<i64>,
    pub logp: Array2<f64>,
    /// Rows per sequence, in order.
    pub lengths: Vec<i64>,
    pub cached_tokens: Option<u64>,
}

impl Positions {
    /// The rows against what the request asked for: `lengths` rows per sequence, and
    /// (replaying a trace) those very `tokens`. A reply that differs is torn or answers
    /// another request.
    pub fn expect(&self, lengths: Option<&[i64]>, tokens: Option<&[i64]>) -> KernelResult<()> {
        if let Some(want) = lengths {
            if want.len() != self.lengths.len() {
                return Err(reply_error(format!(
                    "{} sequences in the reply, {} in the request",
                    self.lengths.len(),
                    want.len()
                )));
            }
            if let Some((s, (got, want))) = self.lengths.iter().zip(want).enumerate().find(|(_, (g, w))| g != w) {
                return Err(reply_error(format!("sequence {s}: {got} positions for {want}")));
            }
        }
        if tokens.is_some_and(|want| want != self.tokens.as_slice()) {
            return Err(reply_error("the replayed tokens differ from the trace sent".to_owned()));
        }
        Ok(())
    }
}

/// Collects `(token, entries)` rows into padded arrays.
pub(super) struct Builder {
    width: usize,
    tokens: Vec<i64>,
    ids: Vec<i64>,
    logp: Vec<f64>,
    pub(super) lengths: Vec<i64>,
    cached: Option<u64>,
}

impl Builder {
    pub(super) fn new(width: usize) -> Self {
        Builder {
            width,
            tokens: Vec::new(),
            ids: Vec::new(),
            logp: Vec::new(),
            lengths: Vec::new(),
            cached: None,
        }
    }

    pub(super) fn row(&mut self, token: i64, entries: impl IntoIterator<Item = (i64, f64)>) {
        self.tokens.push(token);
        let start = self.ids.len();
        for (id, lp) in entries.into_iter().take(self.width) {
            self.ids.push(id);
            self.logp.push(lp);
        }
        let pad = self.width - (self.ids.len() - start);
        self.ids.extend(std::iter::repeat_n(-1, pad));
        self.logp.extend(std::iter::repeat_n(f64::NEG_INFINITY, pad));
    }

    pub(super) fn cached(&mut self, c: Option<u64>) {
        add_cached(&mut self.cached, c);
    }

    pub(super) fn finish(self) -> KernelResult<Positions> {
        let rows = self.tokens.len();
        let shape_err = |e: ndarray::ShapeError| reply_error(format!("positions: {e}"));
        Ok(Positions {
            ids: Array2::from_shape_vec((rows, self.width), self.ids).map_err(shape_err)?,
            logp: Array2::from_shape_vec((rows, self.width), self.logp).map_err(shape_err)?,
            tokens: self.tokens,
            lengths: self.lengths,
            cached_tokens: self.cached,
        })
    }
}

// ---------------------------------------------------------------- SGLang generate
type Lists = Option<Vec<Option<Vec<Triple>>>>;

#[derive(Deserialize)]
struct Meta {
    id: Option<String>,
    prompt_tokens: Option<u64>,
    output_token_logprobs: Option<Vec<Triple>>,
    input_top_logprobs: Lists,
    output_top_logprobs: Lists,
    input_token_ids_logprobs: Lists,
    output_token_ids_logprobs: Lists,
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Item {
    meta_info: Meta,
}

/// Every position of each item of a batched SGLang reply. A draft (`scored` false)
/// reads the generated tokens and the chosen lists at them; the scoring of a given
/// continuation (`scored` true) reads the input positions after the first (which
/// SGLang answers as None) and the first generated position.
/// Item `r` must echo row `r`'s `rid` (`{id}-{r}`) and prompt tokens.
pub fn parse_sglang(
    body: &[u8],
    rows: usize,
    width: usize,
    field: Field,
    scored: bool,
    echo: &Echo,
) -> KernelResult<Positions> {
    let items: Vec<Item> = serde_json::from_slice(body).map_err(|e| json_error("not an SGLang batch reply", &e))?;
    if items.len() != rows {
        return Err(reply_error(format!("expected {rows} replies, got {}", items.len())));
    }
    let mut out = Builder::new(width);
    for (r, Item { meta_info: m }) in items.into_iter().enumerate() {
        echo.check_id(Some(r), m.id.as_deref())?;
        echo.check_prompt(r..r + 1, m.prompt_tokens)?;
        out.cached(m.cached_tokens);
        let (input, output) = if field == Field::Top {
            (m.input_top_logprobs, m.output_top_logprobs)
        } else {
            (m.input_token_ids_logprobs, m.output_token_ids_logprobs)
        };
        let missing = |what: &str| reply_error(format!("reply {r} has no {what}"));
        let output = output.ok_or_else(|| missing("output log probabilities"))?;
        let (tokens, positions): (Vec<i64>, Vec<Option<Vec<Triple>>>) = if scored {
            let input = input.ok_or_else(|| missing("input log probabilities"))?;
            let positions: Vec<_> = input.into_iter().skip(1).chain(output.into_iter().take(1)).collect();
            (vec![-1; positions.len()], positions)
        } else {
            let tokens = m
                .output_token_logprobs
                .ok_or_else(|| missing("output_token_logprobs"))?;
            if tokens.len() != output.len() {
                return Err(reply_error(format!(
                    "reply {r}: {} tokens, {} positions",
                    tokens.len(),
                    output.len()
                )));
            }
            (tokens.into_iter().map(|t| t.0).collect(), output)
        };
        out.lengths.push(i64::try_from(positions.len()).unwrap_or(i64::MAX));
        for (token, p) in tokens.into_iter().zip(positions) {
            out.row(token, p.unwrap_or_default().into_iter().map(|t| (t.0, t.1)));
        }
    }
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sglang_positions_of_drafts_and_scored_continuations() {
        let body = br#"[{"text":"x","meta_info":{"output_token_logprobs":[[-0.1,5,null],[-0.2,6,null]],
            "output_top_logprobs":[[[-0.1,5,null],[-2.0,7,null]],[[-0.2,6,null]]],
            "input_top_logprobs":[null,[[-0.3,8,null]]],"cached_tokens":3}}]"#;
        let d = parse_sglang(body, 1, 2, Field::Top, false, &Echo::default()).unwrap();
        assert_eq!((d.tokens.clone(), d.lengths.clone()), (vec![5, 6], vec![2]));
        assert_eq!(d.ids.row(0).to_vec(), vec![5, 7]);
        assert_eq!(d.ids.row(1).to_vec(), vec![6, -1]);
        let s = parse_sglang(body, 1, 2, Field::Top, true, &Echo::default()).unwrap();
        assert_eq!(s.lengths, vec![2]);
        assert_eq!(s.ids.row(0).to_vec(), vec![8, -1]);
        assert_eq!(s.ids.row(1).to_vec(), vec![5, 7]);
        assert!(parse_sglang(body, 1, 2, Field::TokenIds, true, &Echo::default()).is_err());
        assert!(parse_sglang(body, 2, 2, Field::Top, false, &Echo::default()).is_err());
        // what the request asked for
        assert!(d.expect(Some(&[2]), Some(&[5, 6])).is_ok());
        assert!(d.expect(Some(&[3]), None).is_err());
        assert!(d.expect(Some(&[2, 1]), None).is_err());
        assert!(d.expect(None, Some(&[5, 7])).is_err());
    }
}
