//! PHP query strings: the encoding Bitrix24 uses inside `batch` commands.
//!
//! Bitrix24 parses every `cmd` value of a batch as PHP's `parse_str` would, so nested parameters
//! travel in bracket syntax (`fields[PHONE][0][VALUE]=...`). [`build`] is PHP's `http_build_query`
//! for JSON values and [`parse`] is `parse_str`; the client uses the first, the simulator the
//! second, and property tests check that one undoes the other. Pure functions, no I/O.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{Map, Value};

/// Characters left bare by PHP's `rawurlencode` (RFC 3986 unreserved).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn enc(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Encodes a JSON object as a PHP query string. Objects become `key[sub]`, arrays `key[0]`,
/// booleans `1`/`0` (Bitrix24 wants explicit flags), and nulls are omitted, as PHP does.
pub fn build(params: &Map<String, Value>) -> String {
    let mut out = Vec::new();
    for (k, v) in params {
        push(&mut out, &enc(k), v);
    }
    out.join("&")
}

fn push(out: &mut Vec<String>, prefix: &str, v: &Value) {
    match v {
        Value::Null => {}
        Value::Bool(b) => out.push(format!("{prefix}={}", if *b { 1 } else { 0 })),
        Value::Number(n) => out.push(format!("{prefix}={}", enc(&n.to_string()))),
        Value::String(s) => out.push(format!("{prefix}={}", enc(s))),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                push(out, &format!("{prefix}%5B{i}%5D"), item);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                push(out, &format!("{prefix}%5B{}%5D", enc(k)), item);
            }
        }
    }
}

/// Decodes a query string the way PHP's `parse_str` does: `+` is a space, brackets nest, `[]`
/// appends. Every leaf is a string; nested containers are JSON objects whose keys keep their
/// order (PHP arrays are ordered maps). Malformed percent escapes are kept literally.
pub fn parse(query: &str) -> Map<String, Value> {
    let mut root = Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_k, raw_v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(raw_k);
        let value = decode(raw_v);
        let (head, path) = split_key(&key);
        if head.is_empty() {
            continue;
        }
        insert(&mut root, head, &path, Value::String(value));
    }
    root
}

fn decode(s: &str) -> String {
    let plus = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus)
        .decode_utf8_lossy()
        .into_owned()
}

/// Splits `a[b][c]` into `a` and `["b", "c"]`. A key whose brackets do not close is taken whole,
/// as PHP does.
fn split_key(key: &str) -> (&str, Vec<String>) {
    let Some(open) = key.find('[') else {
        return (key, Vec::new());
    };
    let head = &key[..open];
    let mut path = Vec::new();
    let mut rest = &key[open..];
    while let Some(stripped) = rest.strip_prefix('[') {
        match stripped.find(']') {
            Some(close) => {
                path.push(stripped[..close].to_string());
                rest = &stripped[close + 1..];
            }
            None => break,
        }
    }
    if path.is_empty() {
        return (key, Vec::new());
    }
    (head, path)
}

fn insert(map: &mut Map<String, Value>, key: &str, path: &[String], value: Value) {
    let key = if key.is_empty() {
        next_index(map)
    } else {
        key.to_string()
    };
    if path.is_empty() {
        map.insert(key, value);
        return;
    }
    let slot = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    if let Value::Object(inner) = slot {
        insert(inner, &path[0], &path[1..], value);
    }
}

fn next_index(map: &Map<String, Value>) -> String {
    let max = map.keys().filter_map(|k| k.parse::<i64>().ok()).max();
    max.map_or(0, |m| m + 1).to_string()
}

/// Turns objects whose keys are exactly `0..n` into arrays, recursively: how a PHP array with
/// sequential integer keys looks once it is JSON-encoded.
pub fn php_arrays_to_lists(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let sequential = !map.is_empty()
                && map
                    .keys()
                    .enumerate()
                    .all(|(i, k)| k.parse::<usize>().ok() == Some(i));
            let converted = map.into_iter().map(|(k, v)| (k, php_arrays_to_lists(v)));
            if sequential {
                Value::Array(converted.map(|(_, v)| v).collect())
            } else {
                Value::Object(converted.collect())
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(php_arrays_to_lists).collect()),
        other => other,
    }
}

/// Like [`php_arrays_to_lists`] but only at the top level: a batch's `result` map keyed `0..n`
/// becomes a list, while the command results inside keep their own shape.
pub fn php_arrays_to_lists_shallow(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let sequential = !map.is_empty()
                && map
                    .keys()
                    .enumerate()
                    .all(|(i, k)| k.parse::<usize>().ok() == Some(i));
            if sequential {
                Value::Array(map.into_iter().map(|(_, v)| v).collect())
            } else {
                Value::Object(map)
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn builds_nested_brackets_like_http_build_query() {
        let p =
            json!({"fields": {"PHONE": [{"VALUE": "+380 50", "VALUE_TYPE": "WORK"}]}, "X": true});
        let q = build(p.as_object().unwrap());
        assert_eq!(
            q,
            "fields%5BPHONE%5D%5B0%5D%5BVALUE%5D=%2B380%2050&fields%5BPHONE%5D%5B0%5D%5BVALUE_TYPE%5D=WORK&X=1"
        );
    }

    #[test]
    fn parses_what_php_parse_str_parses() {
        let m = parse("a[]=1&a[]=2&b[x][y]=z+w&c=%26&select[]=ID");
        assert_eq!(
            Value::Object(m),
            json!({"a": {"0": "1", "1": "2"}, "b": {"x": {"y": "z w"}}, "c": "&", "select": {"0": "ID"}})
        );
    }

    #[test]
    fn round_trips_strings_and_nesting() {
        let p = json!({"k": "a&b=c[d]", "n": {"0": "x", "q": {"r": "ü €"}}});
        let back = parse(&build(p.as_object().unwrap()));
        assert_eq!(Value::Object(back), p);
    }

    #[test]
    fn sequential_integer_keys_become_lists() {
        let v = php_arrays_to_lists(json!({"0": "a", "1": {"0": 1}}));
        assert_eq!(v, json!(["a", [1]]));
        let v = php_arrays_to_lists(json!({"0": "a", "2": "b"}));
        assert_eq!(v, json!({"0": "a", "2": "b"}));
    }
}
