//! Bitrix24's wire formats, decoded leniently (`bitrix24-api.md` §1.4, §3, §11.4).
//!
//! Tolerates what real portals send: `[]` for empty maps, numbers as strings, integer or float
//! `time` fields, missing `operating` counters, empty `error` codes with the meaning in
//! `error_description`, and HTML or empty bodies on 5xx/429. Pure functions, no I/O.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The `time` block of a response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TimeInfo {
    pub operating: Option<f64>,
    pub operating_reset_at: Option<i64>,
    pub processing: Option<f64>,
}

/// A successful response.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub result: Value,
    pub total: Option<u64>,
    pub next: Option<u64>,
    pub time: TimeInfo,
}

/// An `{error, error_description}` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: String,
    pub description: String,
}

impl ErrorBody {
    /// The code, or a code derived from the description when the portal left it empty.
    pub fn effective_code(&self) -> String {
        if !self.code.is_empty() {
            return self.code.clone();
        }
        let d = self.description.to_lowercase();
        if d.contains("access denied") {
            "ACCESS_DENIED".into()
        } else if d.contains("call is not found") {
            "CALL_NOT_FOUND".into()
        } else {
            String::new()
        }
    }
}

/// What one HTTP response decoded to.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Ok(Envelope),
    Error(ErrorBody),
    /// Not JSON, or JSON of no known shape: the first bytes, for the log.
    Unreadable(String),
}

/// A number that may arrive as a JSON number or a string.
pub fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An integer that may arrive as a JSON number, a float or a string.
pub fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => {
            let s = s.trim();
            s.parse()
                .ok()
                .or_else(|| s.parse::<f64>().ok().map(|f| f as i64))
        }
        _ => None,
    }
}

/// Text of a scalar; `None` for null, empty strings and containers.
pub fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A map that PHP may have encoded as `[]` (empty) or as a list (sequential keys).
pub fn map_or_list(v: &Value) -> BTreeMap<String, Value> {
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v.clone()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

pub fn time_info(v: Option<&Value>) -> TimeInfo {
    let Some(Value::Object(t)) = v else {
        return TimeInfo::default();
    };
    TimeInfo {
        operating: t.get("operating").and_then(as_f64),
        operating_reset_at: t.get("operating_reset_at").and_then(as_i64),
        processing: t.get("processing").and_then(as_f64),
    }
}

fn error_body(m: &Map<String, Value>) -> Option<ErrorBody> {
    let code = m.get("error")?;
    let code = match code {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let description = m
        .get("error_description")
        .or_else(|| m.get("error_message"))
        .and_then(|d| d.as_str().map(str::to_string))
        .unwrap_or_default();
    Some(ErrorBody { code, description })
}

/// Decodes a response body whatever the status.
pub fn decode(body: &[u8]) -> Decoded {
    let text = String::from_utf8_lossy(body);
    let snippet = || {
        let t: String = text.chars().take(200).collect();
        if t.trim().is_empty() {
            "(empty body)".to_string()
        } else {
            t.split_whitespace().collect::<Vec<_>>().join(" ")
        }
    };
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
        return Decoded::Unreadable(snippet());
    };
    if let Some(e) = error_body(&m) {
        return Decoded::Error(e);
    }
    match m.get("result") {
        Some(result) => Decoded::Ok(Envelope {
            result: result.clone(),
            total: m.get("total").and_then(as_i64).map(|t| t.max(0) as u64),
            next: m.get("next").and_then(as_i64).map(|t| t.max(0) as u64),
            time: time_info(m.get("time")),
        }),
        None => Decoded::Unreadable(snippet()),
    }
}

/// The outcome of every command in a batch, by command key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchOutcome {
    pub results: BTreeMap<String, Value>,
    pub errors: BTreeMap<String, ErrorBody>,
    pub totals: BTreeMap<String, u64>,
    pub nexts: BTreeMap<String, u64>,
    pub times: BTreeMap<String, TimeInfo>,
}

impl BatchOutcome {
    /// Whether every one of `keys` got an answer: a result or an error of its own.
    pub fn answers_all(&self, mut keys: impl Iterator<Item = String>) -> bool {
        keys.all(|k| self.results.contains_key(&k) || self.errors.contains_key(&k))
    }

    /// Decodes a batch's `result` block (§3 Response), tolerating `[]` and list shapes.
    pub fn from_result(result: &Value) -> BatchOutcome {
        let field = |name: &str| result.get(name).map(map_or_list).unwrap_or_default();
        let errors = field("result_error")
            .into_iter()
            .filter_map(|(k, v)| match &v {
                Value::Object(m) => error_body(m).map(|e| (k, e)),
                _ => None,
            })
            .collect();
        BatchOutcome {
            results: field("result"),
            errors,
            totals: field("result_total")
                .into_iter()
                .filter_map(|(k, v)| as_i64(&v).map(|n| (k, n.max(0) as u64)))
                .collect(),
            nexts: field("result_next")
                .into_iter()
                .filter_map(|(k, v)| as_i64(&v).map(|n| (k, n.max(0) as u64)))
                .collect(),
            times: field("result_time")
                .into_iter()
                .map(|(k, v)| (k, time_info(Some(&v))))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_the_documented_error_batch_with_empty_maps_as_lists() {
        let body = json!({"result":{"result":[],"result_error":{"get_user":{"error":"insufficient_scope","error_description":""}},
            "result_total":[],"result_next":[],"result_time":[]},"time":{"start":1}});
        let Decoded::Ok(env) = decode(body.to_string().as_bytes()) else {
            panic!()
        };
        let b = BatchOutcome::from_result(&env.result);
        assert!(b.results.is_empty());
        assert_eq!(b.errors["get_user"].code, "insufficient_scope");
    }

    #[test]
    fn html_and_empty_bodies_are_unreadable_not_panics() {
        assert!(matches!(
            decode(b"<html>502</html>"),
            Decoded::Unreadable(_)
        ));
        assert!(matches!(decode(b""), Decoded::Unreadable(s) if s == "(empty body)"));
    }

    #[test]
    fn an_empty_error_code_is_recovered_from_the_description() {
        let e = ErrorBody {
            code: String::new(),
            description: "Access denied.".into(),
        };
        assert_eq!(e.effective_code(), "ACCESS_DENIED");
    }

    #[test]
    fn integer_time_fields_and_string_numbers_are_accepted() {
        let Decoded::Ok(env) = decode(br#"{"result":1,"total":"7","time":{"operating":"1.5","operating_reset_at":1773131378.0}}"#) else { panic!() };
        assert_eq!(env.total, Some(7));
        assert_eq!(env.time.operating, Some(1.5));
        assert_eq!(env.time.operating_reset_at, Some(1773131378));
    }
}
