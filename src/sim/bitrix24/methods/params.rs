//! Reading method parameters and answering lists the way the portal does: lenient scalars,
//! `FILTER` operators, `select`, pages of 50.

use super::*;

pub(super) fn digits(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

pub(super) fn err(status: u16, code: &str, description: &str) -> ApiError {
    ApiError::new(status, code, description)
}

pub(super) fn core(description: &str) -> ApiError {
    err(400, "ERROR_CORE", description)
}

pub(super) fn s(params: &Map<String, Value>, key: &str) -> Option<String> {
    match get_ci(params, key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.into()),
        _ => None,
    }
}

pub(super) fn int(params: &Map<String, Value>, key: &str) -> Option<i64> {
    match get_ci(params, key)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

pub(super) fn obj<'a>(params: &'a Map<String, Value>, key: &str) -> Option<&'a Map<String, Value>> {
    get_ci(params, key)?.as_object()
}

pub(super) fn list_of_strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .or_else(|| x.as_i64().map(|n| n.to_string()))
            })
            .collect(),
        Some(Value::Object(m)) => m
            .values()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// A phone number a portal accepts: optional `+`, digits with common separators, 3–20 digits.
pub(super) fn phone_ok(p: &str) -> bool {
    let stripped: String = p
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')'))
        .collect();
    let body = stripped.strip_prefix('+').unwrap_or(&stripped);
    !body.is_empty() && body.chars().all(|c| c.is_ascii_digit()) && (3..=20).contains(&body.len())
}

/// ISO 8601 as PHP's DateTime reads it: with an offset, or without (then in the portal's zone).
pub(super) fn parse_iso(raw: &str, tz: Tz) -> Option<DateTime<FixedOffset>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t);
    }
    if let Ok(t) = DateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%z") {
        return Some(t);
    }
    let naive = NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S"))
        .ok()?;
    tz.from_local_datetime(&naive)
        .earliest()
        .map(|t| t.fixed_offset())
}

pub(super) fn page(params: &Map<String, Value>) -> usize {
    int(params, "start").filter(|s| *s > 0).unwrap_or(0) as usize
}

/// Slices `items` to one page of 50 and fills `total`/`next` like a list method.
pub(super) fn paged(items: Vec<Value>, start: usize) -> ApiOk {
    let total = items.len();
    let rows: Vec<Value> = items.into_iter().skip(start).take(50).collect();
    let next = (start + 50 < total).then_some((start + 50) as u64);
    ApiOk {
        result: Value::Array(rows),
        total: Some(total as u64),
        next,
    }
}

/// A list filter key with its operator prefix split off (`>=CALL_START_DATE` → (">=", ...)).
pub(super) fn split_op(key: &str) -> (&str, &str) {
    for op in [">=", "<=", "!=", "!@", "@", ">", "<", "=", "!", "%"] {
        if let Some(rest) = key.strip_prefix(op) {
            return (op, rest);
        }
    }
    ("", key)
}

pub(super) fn cmp_matches(op: &str, ord: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        ">=" => ord != Less,
        "<=" => ord != Greater,
        ">" => ord == Greater,
        "<" => ord == Less,
        "!" | "!=" => ord != Equal,
        _ => ord == Equal,
    }
}

/// Compares a field value with a filter value: instants if both parse as dates, numbers if both
/// are numeric, text otherwise; `@` takes a list.
pub(super) fn filter_matches(op: &str, field: &Value, want: &Value, tz: Tz) -> bool {
    if op == "@" || op == "!@" {
        let set = list_of_strings(Some(want));
        let hit = set.iter().any(|w| value_text(field) == *w);
        return if op == "@" { hit } else { !hit };
    }
    if op == "%" {
        return value_text(field)
            .to_lowercase()
            .contains(&value_text(want).to_lowercase());
    }
    let (f, w) = (value_text(field), value_text(want));
    if let (Some(a), Some(b)) = (parse_iso(&f, tz), parse_iso(&w, tz)) {
        return cmp_matches(op, a.cmp(&b));
    }
    if let (Ok(a), Ok(b)) = (f.parse::<f64>(), w.parse::<f64>()) {
        return cmp_matches(op, a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal));
    }
    cmp_matches(op, f.cmp(&w))
}

pub(super) fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => if *b { "Y" } else { "N" }.into(),
        other => other.to_string(),
    }
}

/// Applies a Bitrix24 list filter to JSON rows (field names upper-case).
pub(super) fn apply_filter(
    rows: Vec<Value>,
    filter: Option<&Map<String, Value>>,
    tz: Tz,
) -> Vec<Value> {
    let Some(filter) = filter else { return rows };
    rows.into_iter()
        .filter(|row| {
            filter.iter().all(|(k, want)| {
                let (op, field) = split_op(k);
                let Some(have) = row.as_object().and_then(|o| get_ci(o, field)) else {
                    return false;
                };
                filter_matches(op, have, want, tz)
            })
        })
        .collect()
}

pub(super) fn select(rows: Vec<Value>, params: &Map<String, Value>) -> Vec<Value> {
    let fields = list_of_strings(get_ci(params, "select"));
    if fields.is_empty() || fields.iter().any(|f| f == "*") {
        return rows;
    }
    rows.into_iter()
        .map(|r| {
            let mut out = Map::new();
            if let Value::Object(m) = r {
                for f in &fields {
                    if let Some((k, v)) = m.iter().find(|(k, _)| k.eq_ignore_ascii_case(f)) {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(out)
        })
        .collect()
}
