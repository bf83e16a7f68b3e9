//! Encoding `batch` requests (`bitrix24-api.md` §3).
//!
//! Command keys are never numeric (a portal would turn the result map into a list), at most 50
//! commands go in one request, and each command's parameters are a PHP query string built by
//! [`crate::phpquery::build`]. `$result[key][FIELD]` references pass through encoding intact
//! because the portal decodes before resolving them. Pure functions, no I/O.

use serde_json::{json, Map, Value};

use crate::phpquery;

/// The most commands one batch may carry.
pub const MAX_COMMANDS: usize = 50;

/// One command of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Unique, non-numeric key, e.g. `r_100231`.
    pub key: String,
    pub method: String,
    pub params: Map<String, Value>,
}

impl Command {
    pub fn new(key: impl Into<String>, method: impl Into<String>, params: Value) -> Self {
        let key = key.into();
        debug_assert!(
            key.parse::<f64>().is_err(),
            "batch keys must not be numeric"
        );
        Self {
            key,
            method: method.into(),
            params: match params {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        }
    }

    /// `method?query`, as a `cmd` value.
    pub fn encode(&self) -> String {
        let q = phpquery::build(&self.params);
        if q.is_empty() {
            self.method.clone()
        } else {
            format!("{}?{}", self.method, q)
        }
    }
}

/// The JSON body of a batch request (without `auth`).
pub fn encode(commands: &[Command], halt: bool) -> Value {
    let cmd: Map<String, Value> = commands
        .iter()
        .map(|c| (c.key.clone(), Value::String(c.encode())))
        .collect();
    json!({"halt": if halt { 1 } else { 0 }, "cmd": cmd})
}

/// A `$result[key][field]` reference to an earlier command's result.
pub fn result_ref(key: &str, field: &str) -> String {
    format!("$result[{key}][{field}]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_survive_encoding_and_decode_back() {
        let c = Command::new(
            "f_1",
            "telephony.externalCall.finish",
            json!({"CALL_ID": result_ref("r_1", "CALL_ID"), "DURATION": 5}),
        );
        let enc = c.encode();
        let (_, q) = enc.split_once('?').unwrap();
        let back = phpquery::parse(q);
        assert_eq!(back["CALL_ID"], "$result[r_1][CALL_ID]");
        assert_eq!(back["DURATION"], "5");
    }
}
