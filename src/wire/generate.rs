//! vLLM `/inference/v1/generate` replies (tokens out): one prompt per request, integer
//! ids, `top_logprobs` a list of `{"token_id", "logprob", "rank"}` in engine order.
use serde::Deserialize;

use super::{reply_error, wire_logprob, Parsed, TopkRows, Usage};
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
    top_logprobs: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    token_id: i64,
    logprob: Option<f64>,
}

/// The first generated position's entries of each reply (one reply per row), and the
/// cached prompt tokens summed over the replies that report them.
pub fn parse_topk<B: AsRef<[u8]>>(bodies: &[B], width: usize) -> KernelResult<Parsed> {
    let mut out = TopkRows::new(bodies.len(), width);
    let mut cached: Option<u64> = None;
    for (r, body) in bodies.iter().enumerate() {
        let reply: Reply = serde_json::from_slice(body.as_ref())
            .map_err(|e| reply_error(format!("row {r}: not a generate reply: {e}")))?;
        if let Some(c) = Usage::cached_tokens(reply.usage) {
            cached = Some(cached.unwrap_or(0) + c);
        }
        let position = reply
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.logprobs)
            .and_then(|l| l.content)
            .and_then(|c| c.into_iter().next())
            .ok_or_else(|| reply_error(format!("row {r}: the reply has no logprobs content")))?;
        out.fill(
            r,
            position
                .top_logprobs
                .into_iter()
                .map(|e| (e.token_id, wire_logprob(e.logprob))),
        );
    }
    Ok(out.finish(cached))
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
}
