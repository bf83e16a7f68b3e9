//! Property tests: arbitrary input never panics the decoders, and the batch encoder round-trips
//! through a PHP-style `parse_str`.

use proptest::prelude::*;
use serde_json::{Map, Value};
use ubsync::bitrix24::batch::Command;
use ubsync::bitrix24::wire::{decode, BatchOutcome};
use ubsync::phpquery;
use ubsync::unitalk::wire::{parse_call, parse_history, parse_lines, parse_users};

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A call record whose every field may have any type (the shapes Unitalk might send).
fn record_like() -> impl Strategy<Value = Value> {
    let field = |name: &'static str| {
        (
            Just(name),
            prop_oneof![
                any_json(),
                "[0-9]{1,6}".prop_map(Value::String),
                "2026-11-2[0-9] [0-2][0-9]:[0-5][0-9]:[0-5][0-9]".prop_map(Value::String)
            ],
        )
    };
    prop::collection::vec(
        prop_oneof![
            field("id"),
            field("date"),
            field("direction"),
            field("from"),
            field("to"),
            field("secondsTalk"),
            field("secondsFullTime"),
            field("state"),
            field("link"),
            field("cause"),
            field("outerNumber")
        ],
        0..11,
    )
    .prop_map(|fields| {
        Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    })
}

/// Batch parameters as Bitrix24 takes them: identifier keys, string leaves, nested maps and lists.
fn params() -> impl Strategy<Value = Value> {
    let leaf = ".{0,16}".prop_map(Value::String);
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(Value::Array),
            prop::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,8}", inner, 1..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What PHP's `parse_str` gives back for `v`: lists become maps keyed by index.
fn as_php(v: &Value) -> Value {
    match v {
        Value::Array(a) => Value::Object(
            a.iter()
                .enumerate()
                .map(|(i, x)| (i.to_string(), as_php(x)))
                .collect(),
        ),
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), as_php(x))).collect()),
        other => other.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn the_unitalk_record_parser_never_panics(v in prop_oneof![any_json(), record_like()]) {
        let _ = parse_call(&v, chrono_tz::Europe::Kyiv);
        let _ = parse_history(&v);
        let _ = parse_users(&v);
        let _ = parse_lines(&v);
    }

    #[test]
    fn a_parsed_record_keeps_its_id_and_raw_json(v in record_like()) {
        if let Ok(c) = parse_call(&v, chrono_tz::Europe::Kyiv) {
            prop_assert_eq!(&c.raw, &v);
            prop_assert!(!c.id.is_empty());
            prop_assert!(c.seconds_full >= c.seconds_talk);
        }
    }

    #[test]
    fn batch_commands_round_trip_through_php_parse_str(fields in prop::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,8}", params(), 0..6)) {
        let map: Map<String, Value> = fields.into_iter().collect();
        let c = Command::new("c_1", "crm.lead.add", Value::Object(map.clone()));
        let encoded = c.encode();
        let query = encoded.split_once('?').map(|(_, q)| q).unwrap_or("");
        prop_assert_eq!(Value::Object(phpquery::parse(query)), as_php(&Value::Object(map)));
    }

    #[test]
    fn the_batch_response_decoder_never_panics(v in any_json()) {
        let _ = BatchOutcome::from_result(&v);
        let _ = decode(v.to_string().as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..256), s in ".{0,64}") {
        let _ = decode(&bytes);
        let _ = phpquery::parse(&s);
        let _ = phpquery::parse(&String::from_utf8_lossy(&bytes));
    }
}
