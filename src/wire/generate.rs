//! vLLM `/inference/v1/generate` replies (tokens out): one prompt per request, integer
//! ids, `top_logprobs` a list of `{"token_id", "logprob", "rank"}` in engine order.
use serde::Deserialize;

use super::positions::{Builder, Positions};
use super::{add_cached, reply_error, wire_logprob, Parsed, TopkRows, Usage};
use crate::errors::KernelResult;

#[derive(Deserialize)]
struct Reply {
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
}

impl Entry {
    fn pair(self) -> (i64, f64) {
        (self.token_id, wire_logprob(self.logprob))
    }
}

/// Reply `r`'s generated positions (at least one) and its cached prompt tokens.
fn read(body: &[u8], r: usize) -> KernelResult<(Vec<Position>, Option<u64>)> {
    let reply: Reply =
        serde_json::from_slice(body).map_err(|e| reply_error(format!("row {r}: not a generate reply: {e}")))?;
    let cached = Usage::cached_tokens(reply.usage);
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
pub fn parse_topk<B: AsRef<[u8]>>(bodies: &[B], width: usize) -> KernelResult<Parsed> {
    let mut out = TopkRows::new(bodies.len(), width);
    let mut cached: Option<u64> = None;
    for (r, body) in bodies.iter().enumerate() {
        let (content, c) = read(body.as_ref(), r)?;
        add_cached(&mut cached, c);
        if let Some(first) = content.into_iter().next() {
            out.fill(r, first.top_logprobs.into_iter().map(Entry::pair));
        }
    }
    Ok(out.finish(cached))
}

/// Every generated position of each reply, one row per position (for speculative
/// rounds). vLLM lists the sampled (or replayed) token first; with `top_k`, a position
/// with more entries than that drops it, so a position reads as the one-token path
/// reads it.
pub fn parse_positions<B: AsRef<[u8]>>(bodies: &[B], width: usize, top_k: Option<usize>) -> KernelResult<Positions> {
    let mut out = Builder::new(width);
    for (r, body) in bodies.iter().enumerate() {
        let (content, c) = read(body.as_ref(), r)?;
        out.cached(c);
        out.lengths.push(i64::try_from(content.len()).unwrap_or(i64::MAX));
        for p in content {
            let token = p
                .token_id
                .ok_or_else(|| reply_error(format!("row {r}: a position without its token_id")))?;
            let skip = usize::from(top_k.is_some_and(|k| p.top_logprobs.len() > k));
            out.row(token, p.top_logprobs.into_iter().skip(skip).map(Entry::pair));
        }
    }
    out.finish()
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
        let Parsed { ids, logp: lp, .. } = parse_topk(&[&a[..], &b[..]], 3).unwrap();
        assert_eq!(ids.row(0).to_vec(), vec![5, 7, -1]);
        assert_eq!(ids.row(1).to_vec(), vec![3, 4, 9]);
        assert_eq!(lp[[0, 1]], f64::NEG_INFINITY);
        assert!(parse_topk(&[&b"{\"choices\": []}"[..]], 3).is_err());
        assert!(parse_topk(&[&b"{\"choices\": ["[..]], 3).is_err());
    }

    #[test]
    fn generate_positions_drop_the_sampled_token_past_top_k() {
        let body = br#"{"choices":[{"logprobs":{"content":[
            {"token_id":9,"logprob":-4.0,"top_logprobs":[{"token_id":9,"logprob":-4.0},{"token_id":1,"logprob":-0.1},{"token_id":2,"logprob":-3.0}]},
            {"token_id":1,"logprob":-0.2,"top_logprobs":[{"token_id":1,"logprob":-0.2},{"token_id":3,"logprob":-9999.0}]}]}}],
            "usage":{"prompt_tokens_details":{"cached_tokens":4}}}"#;
        let p = parse_positions(&[&body[..]], 3, Some(2)).unwrap();
        assert_eq!(p.tokens, vec![9, 1]);
        assert_eq!(p.lengths, vec![2]);
        assert_eq!(p.ids.row(0).to_vec(), vec![1, 2, -1]);
        assert_eq!(p.ids.row(1).to_vec(), vec![1, 3, -1]);
        assert_eq!(p.logp[[1, 1]], f64::NEG_INFINITY);
        assert_eq!(p.cached_tokens, Some(4));
        let all = parse_positions(&[&body[..]], 3, None).unwrap();
        assert_eq!(all.ids.row(0).to_vec(), vec![9, 1, 2]);
        assert!(parse_positions(&[&br#"{"choices":[{"logprobs":{"content":[]}}]}"#[..]], 3, None).is_err());
    }
}
