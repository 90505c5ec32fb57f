//! SGLang native `/generate` replies to a batch: a list with one object per prompt, whose
//! `meta_info` holds per-position lists of `[logprob, token_id, text|null]` triples.
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::{add_cached, json_error, reply_error, wire_logprob, Echo, Parsed, TopkRows};
use crate::errors::KernelResult;

/// Which per-position list to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `output_top_logprobs`: the top-k at each generated position.
    Top,
    /// `output_token_ids_logprobs`: the ids asked for with `token_ids_logprob`.
    TokenIds,
}

impl Field {
    fn key(self) -> &'static str {
        match self {
            Field::Top => "output_top_logprobs",
            Field::TokenIds => "output_token_ids_logprobs",
        }
    }
}

/// One `[logprob, token_id, text]` triple (text skipped).
pub(super) struct Triple(pub i64, pub f64);

impl<'de> Deserialize<'de> for Triple {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TripleVisitor;

        impl<'de> Visitor<'de> for TripleVisitor {
            type Value = Triple;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a [logprob, token_id, text] triple")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Triple, A::Error> {
                let lp: Option<f64> = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let id: i64 = seq.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Triple(id, wire_logprob(lp)))
            }
        }

        deserializer.deserialize_seq(TripleVisitor)
    }
}

/// The first position's triples from the chosen field of `meta_info`, its
/// `cached_tokens` (prompt tokens the radix cache served), and what it echoes of the
/// request: `id` (the `rid` sent) and `prompt_tokens`.
#[derive(Default)]
struct FirstPosition {
    triples: Option<Vec<Triple>>,
    cached: Option<u64>,
    id: Option<String>,
    prompt_tokens: Option<u64>,
}

struct MetaSeed(Field);

impl<'de> de::DeserializeSeed<'de> for MetaSeed {
    type Value = FirstPosition;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<FirstPosition, D::Error> {
        struct MetaVisitor(Field);

        impl<'de> Visitor<'de> for MetaVisitor {
            type Value = FirstPosition;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a meta_info object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstPosition, A::Error> {
                let mut out = FirstPosition::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == self.0.key() {
                        let positions: Option<Vec<Option<Vec<Triple>>>> = map.next_value()?;
                        out.triples = positions.and_then(|p| p.into_iter().next().flatten());
                    } else if key == "cached_tokens" {
                        out.cached = map.next_value::<Option<u64>>()?;
                    } else if key == "id" {
                        out.id = map.next_value::<Option<String>>()?;
                    } else if key == "prompt_tokens" {
                        out.prompt_tokens = map.next_value::<Option<u64>>()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
        }

        deserializer.deserialize_map(MetaVisitor(self.0))
    }
}

/// One object of the reply list: only `meta_info` is read.
struct Item(FirstPosition);

struct ItemSeed(Field);

impl<'de> de::DeserializeSeed<'de> for ItemSeed {
    type Value = Item;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Item, D::Error> {
        struct ItemVisitor(Field);

        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = Item;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a generate reply object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                let mut first = FirstPosition::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "meta_info" {
                        first = map.next_value_seed(MetaSeed(self.0))?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Item(first))
            }
        }

        deserializer.deserialize_map(ItemVisitor(self.0))
    }
}

struct ListSeed(Field);

impl<'de> de::DeserializeSeed<'de> for ListSeed {
    type Value = Vec<Item>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Item>, D::Error> {
        struct ListVisitor(Field);

        impl<'de> Visitor<'de> for ListVisitor {
            type Value = Vec<Item>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of generate reply objects")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Item>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(16));
                while let Some(item) = seq.next_element_seed(ItemSeed(self.0))? {
                    out.push(item);
                }
                Ok(out)
            }
        }

        deserializer.deserialize_seq(ListVisitor(self.0))
    }
}

/// The first generated position's entries of each prompt of a batched reply.
/// Cached prompt tokens are summed over the items that report them. Item `r` must echo
/// row `r`'s `rid` (`{id}-{r}`) and prompt tokens.
pub fn parse_topk(body: &[u8], rows: usize, width: usize, field: Field, echo: &Echo) -> KernelResult<Parsed> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let items = de::DeserializeSeed::deserialize(ListSeed(field), &mut de)
        .and_then(|items| de.end().map(|()| items))
        .map_err(|e| json_error("not an SGLang batch reply", &e))?;
    if items.len() != rows {
        return Err(reply_error(format!("expected {rows} replies, got {}", items.len())));
    }
    let mut out = TopkRows::new(rows, width);
    let mut cached: Option<u64> = None;
    for (r, Item(first)) in items.into_iter().enumerate() {
        echo.check_id(Some(r), first.id.as_deref())?;
        echo.check_prompt(r..r + 1, first.prompt_tokens)?;
        add_cached(&mut cached, first.cached);
        let triples = first
            .triples
            .ok_or_else(|| reply_error(format!("reply {r} has no {} at the first position", field.key())))?;
        out.fill(r, triples.into_iter().map(|Triple(id, lp)| (id, lp)));
    }
    Ok(out.finish(cached))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_chosen_field_of_each_item() {
        let body = br#"[
            {"text":"a","output_ids":[5],"meta_info":{"id":"x","output_token_logprobs":[[-0.1,5,null]],
             "output_top_logprobs":[[[-0.1,5,null],[null,7,"b"]]],"output_token_ids_logprobs":[[[-3.0,9,null]]],
             "finish_reason":{"type":"length","length":1}}},
            {"meta_info":{"output_top_logprobs":[[[-0.5,3,null],[-1.5,4,null],[-2.0,9,null]]]}}
        ]"#;
        let none = Echo::default();
        let Parsed { ids, logp: lp, .. } = parse_topk(body, 2, 3, Field::Top, &none).unwrap();
        assert_eq!(ids.row(0).to_vec(), vec![5, 7, -1]);
        assert_eq!(ids.row(1).to_vec(), vec![3, 4, 9]);
        assert_eq!(lp[[0, 1]], f64::NEG_INFINITY);
        assert!(parse_topk(&body[..], 2, 1, Field::TokenIds, &none).is_err()); // the second item has none
        assert!(parse_topk(body, 3, 3, Field::Top, &none).is_err());
        assert!(parse_topk(b"[", 1, 3, Field::Top, &none).is_err());
        assert!(parse_topk(br#"{"meta_info":{}}"#, 1, 3, Field::Top, &none).is_err());
        let rid = |s: &str| Echo {
            request_id: Some(s.into()),
            prompt_tokens: Some(vec![2, 9]),
        };
        // the first item says id "x": row 0 of request "x" would be "x-0"
        assert!(parse_topk(body, 2, 3, Field::Top, &rid("x")).is_err());
        let echoed = br#"[{"meta_info":{"id":"q-0","prompt_tokens":2,"output_top_logprobs":[[[-0.1,5,null]]]}},
            {"meta_info":{"id":"q-1","prompt_tokens":9,"output_top_logprobs":[[[-0.1,5,null]]]}}]"#;
        assert!(parse_topk(echoed, 2, 3, Field::Top, &rid("q")).is_ok());
        assert!(parse_topk(echoed, 2, 3, Field::Top, &rid("p")).is_err());
        let mut short = rid("q");
        short.prompt_tokens = Some(vec![2, 8]);
        assert!(parse_topk(echoed, 2, 3, Field::Top, &short).is_err());
    }
}
