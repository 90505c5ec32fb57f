//! vLLM `/v1/completions` replies with `"token_id:N"` keys (batched, one choice per prompt).
use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::{json_error, reply_error, wire_logprob, Echo, Parsed, TopkRows, Usage};
use crate::errors::KernelResult;

const ID_PREFIX: &str = "token_id:";

#[derive(Deserialize)]
struct Reply {
    id: Option<String>,
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    index: usize,
    logprobs: Option<Logprobs>,
}

#[derive(Deserialize)]
struct Logprobs {
    top_logprobs: Vec<Option<Entries>>,
}

/// One position's `{"token_id:N": logprob, ...}`, in the order sent.
struct Entries(Vec<(i64, f64)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;

        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of \"token_id:N\": log probability")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(32));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: f64 = map.next_value()?;
                    let id = key
                        .strip_prefix(ID_PREFIX)
                        .and_then(|n| n.parse::<i64>().ok())
                        .ok_or_else(|| {
                            de::Error::custom(format!(
                                "key {key:?} is not a token id; is return_tokens_as_token_ids ignored?"
                            ))
                        })?;
                    out.push((id, wire_logprob(Some(value))));
                }
                Ok(Entries(out))
            }
        }

        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// The first position's entries of each choice, each (rows, width), padded with id −1
/// and −inf; rows in `index` order. vLLM reports cached tokens for the batch's last prompt.
/// The reply must echo `echo` (vLLM's `id` is `cmpl-` and the `X-Request-Id` sent; its
/// `usage.prompt_tokens` counts every prompt).
pub fn parse_topk(body: &[u8], rows: usize, width: usize, echo: &Echo) -> KernelResult<Parsed> {
    let reply: Reply = serde_json::from_slice(body).map_err(|e| json_error("not a completions reply", &e))?;
    echo.check_id(None, reply.id.as_deref())?;
    let (prompt_tokens, cached) = Usage::counts(reply.usage);
    echo.check_prompt(0..rows, prompt_tokens)?;
    if reply.choices.len() != rows {
        return Err(reply_error(format!(
            "expected {rows} choices, got {}",
            reply.choices.len()
        )));
    }
    let mut out = TopkRows::new(rows, width);
    let mut seen = vec![false; rows];
    for choice in reply.choices {
        let r = choice.index;
        if r >= rows || seen[r] {
            return Err(reply_error(format!("choice index {r} is out of range or repeated")));
        }
        seen[r] = true;
        let entries = choice
            .logprobs
            .and_then(|l| l.top_logprobs.into_iter().next().flatten())
            .ok_or_else(|| reply_error(format!("choice {r} has no top_logprobs")))?;
        out.fill(r, entries.0);
    }
    Ok(out.finish(cached))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rows_in_index_order_and_pads() {
        let body = br#"{"id":"x","choices":[
            {"index":1,"text":"a \"token_id:9\": 1","logprobs":{"tokens":["token_id:5"],"top_logprobs":[{"token_id:5":-0.1,"token_id:7":-9999.0}]}},
            {"index":0,"logprobs":{"top_logprobs":[{"token_id:3":-0.5,"token_id:4":-1.5,"token_id:9":-2.0}]},"finish_reason":"length"}
        ],"usage":{}}"#;
        let Parsed {
            ids,
            logp: lp,
            cached_tokens,
        } = parse_topk(body, 2, 3, &Echo::default()).unwrap();
        assert_eq!(cached_tokens, None);
        assert_eq!(ids.row(0).to_vec(), vec![3, 4, 9]);
        assert_eq!(ids.row(1).to_vec(), vec![5, 7, -1]);
        assert_eq!(lp[[1, 1]], f64::NEG_INFINITY);
        assert!(parse_topk(body, 3, 3, &Echo::default()).is_err());
        let cached = br#"{"choices":[{"index":0,"logprobs":{"top_logprobs":[{"token_id:3":-0.5}]}}],
            "usage":{"prompt_tokens":40,"prompt_tokens_details":{"cached_tokens":32}}}"#;
        assert_eq!(
            parse_topk(cached, 1, 2, &Echo::default()).unwrap().cached_tokens,
            Some(32)
        );
        let sent = |n: u64| Echo {
            request_id: None,
            prompt_tokens: Some(vec![n]),
        };
        assert!(parse_topk(cached, 1, 2, &sent(40)).is_ok());
        assert!(parse_topk(cached, 1, 2, &sent(39)).is_err());
        let echoed = br#"{"id":"cmpl-r7","choices":[{"index":0,"logprobs":{"top_logprobs":[{"token_id:3":-0.5}]}}]}"#;
        let id = |s: &str| Echo {
            request_id: Some(s.into()),
            prompt_tokens: None,
        };
        assert!(parse_topk(echoed, 1, 2, &id("r7")).is_ok());
        assert!(parse_topk(echoed, 1, 2, &id("r6")).is_err());
        assert!(parse_topk(b"{\"choices\": [", 1, 2, &Echo::default()).is_err());
        assert!(parse_topk(
            br#"{"choices":[{"index":0,"logprobs":{"top_logprobs":[{"a":-1.0}]}}]}"#,
            1,
            2,
            &Echo::default()
        )
        .is_err());
    }
}
