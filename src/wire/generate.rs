//! vLLM `/inference/v1/generate` replies (tokens out): one prompt per request, integer
//! ids, `top_logprobs` a list of `{"token_id", "logprob", "rank"}` in engine order.
use serde::Deserialize;

use super::positions::{Builder, Positions};
use super::{add_cached, json_error, reply_error, wire_logprob, Echo, Parsed, TopkRows, Usage};
use crate::errors::KernelResult;

#[derive(Deserialize)]
struct Reply {
    request_id: Option<String>,
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    logprobs: Option<Logprobs>,
}

#[derive(Deserialize)]
struct Logprobs {
    content: Option<Vec<Position>>,
}

#[derive(Deserialize)]
struct Position {
    /// The sampled (or replayed) token.
    token_id: Option<i64>,
    top_logprobs: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    token_id: i64,
    logprob: Option<f64>,
    /// The id's rank over the vocabulary (1 is the most likely), where given.
    rank: Option<i64>,
}

impl Entry {
    fn pair(self) -> (i64, f64) {
        (self.token_id, wire_logprob(self.logprob))
    }
}

/// Reply `r`'s generated positions (at least one) and its cached prompt tokens; it must
/// echo its request's id (vLLM answers `generate-tokens-` and the `X-Request-Id` sent;
/// each reply is to a request of its own, for one row) and row `r`'s prompt tokens.
fn read(body: &[u8], r: usize, echo: &Echo) -> KernelResult<(Vec<Position>, Option<u64>)> {
    let reply: Reply =
        serde_json::from_slice(body).map_err(|e| json_error(&format!("row {r}: not a generate reply"), &e))?;
    echo.check_id(None, reply.request_id.as_deref())?;
    let (prompt_tokens, cached) = Usage::counts(reply.usage);
    echo.check_prompt(r..r + 1, prompt_tokens)?;
    let content = reply
        .choices
        .into_iter()
        .next()
        .and_then(|c| c.logprobs)
        .and_then(|l| l.content)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| reply_error(format!("row {r}: the reply has no logprobs content")))?;
    Ok((content, cached))
}

/// The first generated position's entries of each reply (one reply per row), and the
/// cached prompt tokens summed over the replies that report them.
pub fn parse_topk<B: AsRef<[u8]>>(bodies: &[B], width: usize, echo: &Echo) -> KernelResult<Parsed> {
    let mut out = TopkRows::new(bodies.len(), width);
    let mut cached: Option<u64> = None;
    for (r, body) in bodies.iter().enumerate() {
        let (content, c) = read(body.as_ref(), r, echo)?;
        add_cached(&mut cached, c);
        if let Some(first) = content.into_iter().next() {
            out.fill(r, first.top_logprobs.into_iter().map(Entry::pair));
        }
    }
    Ok(out.finish(cached))
}

/// Every generated position of each reply, one row per position (for speculative
/// rounds). vLLM lists the sampled (or replayed) token first, then the most likely ids;
/// with `top_k`, a position keeps the entries ranked within the top k (or, without
/// ranks, drops the first entry when there are more than k), so that it reads as the
/// one-token path reads it: a replayed token outside the top k never takes the place of
/// the k-th.
pub fn parse_positions<B: AsRef<[u8]>>(
    bodies: &[B],
    width: usize,
    top_k: Option<usize>,
    echo: &Echo,
) -> KernelResult<Positions> {
    let mut out = Builder::new(width);
    for (r, body) in bodies.iter().enumerate() {
        let (content, c) = read(body.as_ref(), r, echo)?;
        out.cached(c);
        out.lengths.push(i64::try_from(content.len()).unwrap_or(i64::MAX));
        for p in content {
            let token = p
                .token_id
                .ok_or_else(|| reply_error(format!("row {r}: a position without its token_id")))?;
            out.row(token, within_top_k(p.top_logprobs, top_k).into_iter().map(Entry::pair));
        }
    }
    out.finish()
}

/// The entries a position keeps (see `parse_positions`): all of them when there are at
/// most `top_k`; else the `top_k` best ranked (or, without ranks, all but the first).
fn within_top_k(entries: Vec<Entry>, top_k: Option<usize>) -> Vec<Entry> {
    let n = entries.len();
    match top_k {
        Some(k) if n > k => {
            if entries.iter().all(|e| e.rank.is_some()) {
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by_key(|&i| entries[i].rank.unwrap_or(i64::MAX));
                let mut keep = vec![false; n];
                for &i in order.iter().take(k) {
                    keep[i] = true;
                }
                entries
                    .into_iter()
                    .zip(keep)
                    .filter_map(|(e, kept)| kept.then_some(e))
                    .collect()
            } else {
                entries.into_iter().skip(n - k).collect()
            }
        }
        _ => entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_row_per_reply() {
        let a = br#"{"request_id":"x","choices":[{"index":0,"finish_reason":"length","token_ids":[5],
            "logprobs":{"content":[{"token_id":5,"logprob":-0.1,"rank":1,"top_logprobs":[
            {"token_id":5,"logprob":-0.1,"rank":1},{"token_id":7,"logprob":-9999.0,"rank":null}]}]}}]}"#;
        let b = br#"{"choices":[{"index":0,"logprobs":{"content":[{"token_id":3,"logprob":-0.5,
            "top_logprobs":[{"token_id":3,"logprob":-0.5},{"token_id":4,"logprob":-1.5},{"token_id":9,"logprob":-2.0}]}]}}]}"#;
        let Parsed { ids, logp: lp, .. } = parse_topk(&[&a[..], &b[..]], 3, &Echo::default()).unwrap();
        assert_eq!(ids.row(0).to_vec(), vec![5, 7, -1]);
        assert_eq!(ids.row(1).to_vec(), vec![3, 4, 9]);
        assert_eq!(lp[[0, 1]], f64::NEG_INFINITY);
        assert!(parse_topk(&[&b"{\"choices\": []}"[..]], 3, &Echo::default()).is_err());
        assert!(parse_topk(&[&b"{\"choices\": ["[..]], 3, &Echo::default()).is_err());
        let echo = Echo {
            request_id: Some("q7".into()),
            prompt_tokens: None,
        };
        assert!(parse_topk(&[&a[..]], 3, &echo).is_err()); // its request_id is "x": another request's
        let a0 = br#"{"request_id":"generate-tokens-q7","choices":[{"logprobs":{"content":[{"token_id":5,"top_logprobs":[]}]}}],
            "usage":{"prompt_tokens":4}}"#;
        assert!(parse_topk(&[&a0[..]], 3, &echo).is_ok());
        let four = Echo {
            request_id: None,
            prompt_tokens: Some(vec![5]),
        };
        assert!(parse_topk(&[&a0[..]], 3, &four).is_err());
    }

    #[test]
    fn generate_positions_drop_the_sampled_token_past_top_k() {
        let body = br#"{"choices":[{"logprobs":{"content":[
            {"token_id":9,"logprob":-4.0,"top_logprobs":[{"token_id":9,"logprob":-4.0},{"token_id":1,"logprob":-0.1},{"token_id":2,"logprob":-3.0}]},
            {"token_id":1,"logprob":-0.2,"top_logprobs":[{"token_id":1,"logprob":-0.2},{"token_id":3,"logprob":-9999.0}]}]}}],
            "usage":{"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let p = parse_positions(&[&body[..]], 3, Some(2), &Echo::default()).unwrap();
        assert_eq!(p.tokens, vec![9, 1]);
        assert_eq!(p.lengths, vec![2]);
        assert_eq!(p.ids.row(0).to_vec(), vec![1, 2, -1]);
        assert_eq!(p.ids.row(1).to_vec(), vec![1, 3, -1]);
        assert_eq!(p.logp[[1, 1]], f64::NEG_INFINITY);
        assert_eq!(p.cached_tokens, Some(4));
        // with ranks: the replayed token (rank 40) is dropped, the true top 2 kept
        let ranked = br#"{"choices":[{"logprobs":{"content":[
            {"token_id":9,"top_logprobs":[{"token_id":9,"logprob":-4.0,"rank":40},{"token_id":1,"logprob":-0.1,"rank":1},
             {"token_id":2,"logprob":-3.0,"rank":2},{"token_id":4,"logprob":-3.5,"rank":3}]}]}}]}"#;
        let r = parse_positions(&[&ranked[..]], 3, Some(2), &Echo::default()).unwrap();
        assert_eq!(r.ids.row(0).to_vec(), vec![1, 2, -1]);
        let all = parse_positions(&[&body[..]], 3, None, &Echo::default()).unwrap();
        assert_eq!(all.ids.row(0).to_vec(), vec![9, 1, 2]);
        assert!(parse_positions(
            &[&br#"{"choices":[{"logprobs":{"content":[]}}]}"#[..]],
            3,
            None,
            &Echo::default()
        )
        .is_err());
    }
}
