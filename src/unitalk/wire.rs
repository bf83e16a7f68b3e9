//! Unitalk's wire formats, parsed tolerantly (`unitalk-api.md` §2.3, §3, §4).
//!
//! Only this file knows Unitalk's field names. Records convert once into domain types
//! ([`Call`], [`UnitalkUser`], [`LineStatus`]); `to` may be a list or a bare string, numbers may be
//! strings, unknown `state`/`direction`/`source` values are kept as `Other`, and a record that
//! cannot be understood yields a [`RecordError`] carrying its raw JSON for quarantine, never a
//! panic. Pure functions, no I/O.

use chrono::{DateTime, NaiveDateTime, Utc};
use chrono_tz::Tz;
use serde_json::Value;

use crate::timezone::local_to_utc;

/// Call direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Direction {
    In,
    Out,
    Inner,
    Other(String),
}

impl Direction {
    fn parse(s: &str) -> Self {
        match s.trim().to_ascii_uppercase().as_str() {
            "IN" | "INCOMING" => Direction::In,
            "OUT" | "OUTGOING" => Direction::Out,
            "INNER" | "INTERNAL" => Direction::Inner,
            _ => Direction::Other(s.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Direction::In => "IN",
            Direction::Out => "OUT",
            Direction::Inner => "INNER",
            Direction::Other(s) => s,
        }
    }
}

/// Call result (`state`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallState {
    Answer,
    NoAnswer,
    Busy,
    BusyOut,
    Fail,
    ChanUnavail,
    Unreachable,
    NoMoney,
    WrongDir,
    Blocked,
    NotExist,
    /// Still ringing: not final, leave it for a later pass.
    Dialing,
    Other(String),
}

impl CallState {
    fn parse(s: &str) -> Self {
        match s.trim().to_ascii_uppercase().as_str() {
            "ANSWER" | "ANSWERED" => CallState::Answer,
            "NOANSWER" | "NO_ANSWER" => CallState::NoAnswer,
            "BUSY" => CallState::Busy,
            "BUSYOUT" => CallState::BusyOut,
            "FAIL" | "FAILED" => CallState::Fail,
            "CHANUNAVAIL" => CallState::ChanUnavail,
            "UNREACHABLE" => CallState::Unreachable,
            "NOMONEY" => CallState::NoMoney,
            "WRONGDIR" => CallState::WrongDir,
            "BLOCKED" => CallState::Blocked,
            "NOT_EXIST" => CallState::NotExist,
            "DIALING" => CallState::Dialing,
            _ => CallState::Other(s.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            CallState::Answer => "ANSWER",
            CallState::NoAnswer => "NOANSWER",
            CallState::Busy => "BUSY",
            CallState::BusyOut => "BUSYOUT",
            CallState::Fail => "FAIL",
            CallState::ChanUnavail => "CHANUNAVAIL",
            CallState::Unreachable => "UNREACHABLE",
            CallState::NoMoney => "NOMONEY",
            CallState::WrongDir => "WRONGDIR",
            CallState::Blocked => "BLOCKED",
            CallState::NotExist => "NOT_EXIST",
            CallState::Dialing => "DIALING",
            CallState::Other(s) => s,
        }
    }
}

/// One call from `/history/get`, understood.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    /// `date` as sent: wall-clock call start in Unitalk's zone.
    pub local_start: NaiveDateTime,
    pub started_at: DateTime<Utc>,
    pub direction: Direction,
    pub from: String,
    pub to: Vec<String>,
    pub outer_number: Option<String>,
    pub seconds_full: u32,
    pub seconds_talk: u32,
    pub state: CallState,
    pub cause: Option<i64>,
    pub link: Option<String>,
    pub source: Option<String>,
    /// `lastGroupName`: the last operator group (queue) the call passed through, when sent.
    pub group: Option<String>,
    /// `meta`, when Unitalk echoes what `phones/directCall` was given (unconfirmed).
    pub meta: Option<String>,
    /// The record exactly as received.
    pub raw: Value,
}

/// A record that could not be understood.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("unreadable Unitalk call record{}: {reason}", .id.as_ref().map(|i| format!(" {i}")).unwrap_or_default())]
pub struct RecordError {
    pub id: Option<String>,
    pub reason: String,
    pub raw: Value,
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => {
            let t = s.trim();
            (!t.is_empty()).then(|| t.to_string())
        }
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn uint(v: Option<&Value>) -> Result<Option<u32>, ()> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(|n| Some(n.min(u32::MAX as u64) as u32))
            .ok_or(()),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s.trim().parse::<u32>().map(Some).map_err(|_| ()),
        Some(_) => Err(()),
    }
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a.iter().filter_map(|x| text(Some(x))).collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Value::Number(n)) => vec![n.to_string()],
        _ => Vec::new(),
    }
}

/// The longest call ubsync believes: a longer duration is a broken record.
pub const MAX_CALL_SECONDS: u32 = 86_400;

/// A call identity as Unitalk can send it: a whole number, possibly as a string of digits
/// (normalized, so `"0042"`, `"42"` and `42` are one call). Floats, negatives, exponents and
/// text are not ids.
fn call_id(v: Option<&Value>, field: &str) -> Result<String, String> {
    let bad = |shown: String| format!("`{field}` {shown} is not a call id (a whole number)");
    match v {
        None | Some(Value::Null) => Err(format!("missing `{field}`")),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|u| u.to_string())
            .ok_or_else(|| bad(n.to_string())),
        Some(Value::String(s)) => {
            let t = s.trim();
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                t.parse::<u64>()
                    .map(|u| u.to_string())
                    .map_err(|_| bad(format!("{s:?}")))
            } else {
                Err(bad(format!("{s:?}")))
            }
        }
        Some(other) => Err(bad(other.to_string())),
    }
}

/// A record's identity under `field` (`unitalk.call_id_field`), for deduplication while paging.
pub fn record_id(raw: &Value, field: &str) -> Option<String> {
    call_id(raw.get(field), field).ok()
}

/// The outcome of a record without `state` and without talk time, from its ITU-T Q.850 hang-up
/// `cause` (Asterisk's `HANGUPCAUSE`), where the code leaves no doubt; `None` where it does
/// (no cause, an unknown code, or a normal clearing whose talk time is not given: it may have
/// been a conversation). `talk` is `secondsTalk` as given (`None` when absent or null).
///
/// | cause | meaning | outcome |
/// |---|---|---|
/// | 16, 31 | normal clearing / unspecified | `NOANSWER` when `secondsTalk` is given as 0, else unknown |
/// | 17 | user busy | `BUSY` |
/// | 18, 19 | no user responding / no answer | `NOANSWER` |
/// | 21 | call rejected | `BUSY` |
/// | 1, 3, 22, 28 | unallocated / no route / number changed / invalid format | `NOT_EXIST` |
/// | 20, 27 | subscriber absent / destination out of order | `UNREACHABLE` |
/// | 34, 38, 41, 42, 102, 127 | no circuit / network out of order / failure / congestion / timer / interworking | `FAIL` |
pub fn state_from_cause(cause: Option<i64>, talk: Option<u32>) -> Option<CallState> {
    Some(match cause? {
        16 | 31 if talk == Some(0) => CallState::NoAnswer,
        17 | 21 => CallState::Busy,
        18 | 19 => CallState::NoAnswer,
        1 | 3 | 22 | 28 => CallState::NotExist,
        20 | 27 => CallState::Unreachable,
        34 | 38 | 41 | 42 | 102 | 127 => CallState::Fail,
        _ => return None,
    })
}

/// Parses one history record with the default identity field `id`; `tz` is Unitalk's zone.
pub fn parse_call(raw: &Value, tz: Tz) -> Result<Call, RecordError> {
    parse_call_as(raw, tz, "id")
}

/// Parses one history record whose identity is `id_field`; `tz` is Unitalk's zone.
pub fn parse_call_as(raw: &Value, tz: Tz, id_field: &str) -> Result<Call, RecordError> {
    let fail = |id: Option<String>, reason: String| RecordError {
        id,
        reason,
        raw: raw.clone(),
    };
    let Some(obj) = raw.as_object() else {
        return Err(fail(None, "not a JSON object".into()));
    };
    let id = call_id(obj.get(id_field), id_field).map_err(|reason| fail(None, reason))?;
    let date_raw =
        text(obj.get("date")).ok_or_else(|| fail(Some(id.clone()), "missing `date`".into()))?;
    let local_start = NaiveDateTime::parse_from_str(&date_raw, "%Y-%m-%d %H:%M:%S")
        .or_else(|_| NaiveDateTime::parse_from_str(&date_raw, "%Y-%m-%dT%H:%M:%S"))
        .map_err(|_| {
            fail(
                Some(id.clone()),
                format!("`date` {date_raw:?} is not YYYY-MM-DD HH:MM:SS"),
            )
        })?;
    let num = |key: &str| {
        uint(obj.get(key)).map_err(|_| {
            fail(
                Some(id.clone()),
                format!("`{key}` is not a number: {}", obj[key]),
            )
        })
    };
    let seconds_full = num("secondsFullTime")?.unwrap_or(0);
    let seconds_talk = num("secondsTalk")?.unwrap_or(0);
    if seconds_full.max(seconds_talk) > MAX_CALL_SECONDS {
        return Err(fail(
            Some(id.clone()),
            format!(
                "a duration of {} s is beyond a day",
                seconds_full.max(seconds_talk)
            ),
        ));
    }
    let direction = text(obj.get("direction"))
        .map(|d| Direction::parse(&d))
        .unwrap_or(Direction::Other(String::new()));
    // `state: null` is seen in production data (older records): talk time proves an answer;
    // otherwise the Q.850 `cause` says what happened where it is unambiguous
    // (`state_from_cause`); what stays unknown is `Other("")`, quarantined by the classifier
    // rather than taken for a missed call.
    let cause = text(obj.get("cause")).and_then(|c| c.trim().parse::<i64>().ok());
    let talk = num("secondsTalk")?;
    let state = match text(obj.get("state")) {
        Some(s) => CallState::parse(&s),
        None if seconds_talk > 0 => CallState::Answer,
        None => state_from_cause(cause, talk).unwrap_or(CallState::Other(String::new())),
    };
    Ok(Call {
        started_at: local_to_utc(local_start, tz),
        local_start,
        direction,
        from: text(obj.get("from")).unwrap_or_default(),
        to: string_list(obj.get("to")),
        outer_number: text(obj.get("outerNumber")),
        seconds_full: seconds_full.max(seconds_talk),
        seconds_talk,
        state,
        cause,
        link: text(obj.get("link")).filter(|l| l.starts_with("http")),
        source: text(obj.get("source")),
        group: text(obj.get("lastGroupName")).filter(|g| !g.trim().is_empty()),
        meta: text(obj.get("meta")).filter(|m| !m.trim().is_empty()),
        raw: raw.clone(),
        id,
    })
}

/// A `/history/get` page: the records (unparsed) and the total.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// The total Unitalk claims for the range, when it says one (it may lie: paging never relies
    /// on it alone).
    pub count: Option<u64>,
    pub calls: Vec<Value>,
    pub warning: Option<String>,
}

/// Parses a `/history/get` success body.
pub fn parse_history(body: &Value) -> Result<HistoryPage, String> {
    let calls = match body.get("calls") {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Null) | None => Vec::new(),
        Some(other) => return Err(format!("`calls` is not a list: {other}")),
    };
    // Missing or non-numeric counts are unknown, not "this page is all".
    let count = body
        .get("count")
        .and_then(|c| text(Some(c)))
        .and_then(|c| c.parse().ok());
    Ok(HistoryPage {
        count,
        calls,
        warning: text(body.get("warning")),
    })
}

/// A Unitalk user (operator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitalkUser {
    pub line: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
}

/// The list inside a body that may be a bare array or an object holding it under one of `keys`.
fn list_in<'a>(body: &'a Value, keys: &[&str]) -> Option<&'a Vec<Value>> {
    if let Value::Array(a) = body {
        return Some(a);
    }
    keys.iter()
        .find_map(|k| body.get(*k).and_then(Value::as_array))
}

/// Parses `/users/list`: a bare array, or an object with `items`/`data`/`list`/`result`/`users`.
/// Users without a `line` are skipped (they cannot be matched to calls).
pub fn parse_users(body: &Value) -> Result<Vec<UnitalkUser>, String> {
    let list = list_in(body, &["items", "data", "list", "result", "users"])
        .ok_or("no list of users in the response")?;
    Ok(list
        .iter()
        .filter_map(|u| {
            let line = text(u.get("line")).or_else(|| text(u.get("sip")))?;
            Some(UnitalkUser {
                line,
                first_name: text(u.get("firstName")),
                last_name: text(u.get("lastName")),
                email: text(u.get("email")),
            })
        })
        .collect())
}

/// An inner line and its status as Unitalk reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineStatus {
    pub line: String,
    pub status: String,
    /// When Unitalk says the status last changed, if it says.
    pub changed_at: Option<NaiveDateTime>,
    pub raw: Value,
}

/// Parses `/phones/inner`. The shape is unconfirmed, so: a bare array or an object with
/// `items`/`data`/`list`/`result`/`phones`/`lines`; the number under `number`/`line`/`sip`/
/// `inner`; the status under `status`/`state`, or derived from a boolean `busy`/`online`.
pub fn parse_lines(body: &Value) -> Result<Vec<LineStatus>, String> {
    let list = list_in(
        body,
        &["items", "data", "list", "result", "phones", "lines"],
    )
    .ok_or("no list of inner lines in the response")?;
    Ok(list
        .iter()
        .filter_map(|l| {
            let line = ["number", "line", "sip", "inner"]
                .iter()
                .find_map(|k| text(l.get(*k)))?;
            let status = ["status", "state"]
                .iter()
                .find_map(|k| text(l.get(*k)))
                .map(|s| s.to_ascii_uppercase())
                .or_else(|| {
                    l.get("busy")
                        .and_then(Value::as_bool)
                        .map(|b| if b { "BUSY" } else { "ONLINE" }.to_string())
                })
                .or_else(|| {
                    l.get("online")
                        .and_then(Value::as_bool)
                        .map(|b| if b { "ONLINE" } else { "OFFLINE" }.to_string())
                })
                .unwrap_or_else(|| "UNKNOWN".into());
            let changed_at = ["updatedAt", "changedAt", "since", "date"]
                .iter()
                .find_map(|k| {
                    text(l.get(*k))
                        .and_then(|d| NaiveDateTime::parse_from_str(&d, "%Y-%m-%d %H:%M:%S").ok())
                });
            Some(LineStatus {
                line,
                status,
                changed_at,
                raw: l.clone(),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Europe::Kyiv;
    use serde_json::json;

    #[test]
    fn only_whole_numbers_are_call_ids() {
        let rec = |id: Value| json!({"id": id, "date": "2026-11-22 10:00:00", "direction": "IN"});
        for (id, want) in [
            (json!(42), "42"),
            (json!("42"), "42"),
            (json!(" 0042 "), "42"),
        ] {
            assert_eq!(parse_call(&rec(id.clone()), Kyiv).unwrap().id, want, "{id}");
        }
        for id in [
            json!(1.5),
            json!(-3),
            json!(1e30),
            json!("abc"),
            json!("12a"),
            json!("1e3"),
            json!(""),
            json!(null),
            json!([1]),
            json!("99999999999999999999999"),
        ] {
            let e = parse_call(&rec(id.clone()), Kyiv).unwrap_err();
            assert!(e.reason.contains("`id`"), "{id}: {}", e.reason);
        }
        // Another identity field, as `unitalk.call_id_field` may name.
        let r = json!({"id": 1, "dbid": "700", "date": "2026-11-22 10:00:00"});
        assert_eq!(parse_call_as(&r, Kyiv, "dbid").unwrap().id, "700");
        assert_eq!(record_id(&r, "dbid").as_deref(), Some("700"));
    }

    #[test]
    fn durations_beyond_a_day_and_null_states_are_explicit() {
        let r = json!({"id": 1, "date": "2026-11-22 10:00:00", "secondsFullTime": 90000});
        assert!(parse_call(&r, Kyiv)
            .unwrap_err()
            .reason
            .contains("beyond a day"));
        let r = json!({"id": 1, "date": "2026-11-22 10:00:00", "state": null, "secondsTalk": 30});
        assert_eq!(parse_call(&r, Kyiv).unwrap().state, CallState::Answer);
        let r =
            json!({"id": 1, "date": "2026-11-22 10:00:00", "state": null, "secondsFullTime": null});
        assert_eq!(
            parse_call(&r, Kyiv).unwrap().state,
            CallState::Other(String::new())
        );
    }

    #[test]
    fn a_null_state_takes_its_outcome_from_an_unambiguous_cause() {
        let rec = |cause: Value, talk: Value| {
            parse_call(
                &json!({"id": 1, "date": "2026-11-22 10:00:00", "state": null,
                        "secondsFullTime": null, "secondsTalk": talk, "cause": cause}),
                Kyiv,
            )
            .unwrap()
            .state
        };
        let unknown = CallState::Other(String::new());
        for (cause, talk, want) in [
            (json!(19), json!(null), CallState::NoAnswer),
            (json!("18"), json!(null), CallState::NoAnswer),
            (json!(17), json!(null), CallState::Busy),
            (json!(21), json!(0), CallState::Busy),
            (json!(16), json!(0), CallState::NoAnswer),
            (json!("16"), json!("0"), CallState::NoAnswer),
            (json!(31), json!(0), CallState::NoAnswer),
            (json!(1), json!(null), CallState::NotExist),
            (json!(27), json!(null), CallState::Unreachable),
            (json!(127), json!(null), CallState::Fail),
            // Talk time is the stronger proof.
            (json!(19), json!(25), CallState::Answer),
            // A normal clearing without talk time may have been a conversation.
            (json!(16), json!(null), unknown.clone()),
            (json!(999), json!(0), unknown.clone()),
            (json!(null), json!(0), unknown.clone()),
            (json!("x"), json!(0), unknown.clone()),
        ] {
            assert_eq!(rec(cause.clone(), talk.clone()), want, "{cause} {talk}");
        }
        // A stated `state` is never overridden by `cause`.
        let c = parse_call(
            &json!({"id": 1, "date": "2026-11-22 10:00:00", "state": "ANSWER", "cause": 19,
                    "secondsTalk": 0}),
            Kyiv,
        )
        .unwrap();
        assert_eq!(c.state, CallState::Answer);
    }

    #[test]
    fn the_documented_example_record_parses() {
        let raw = json!({"id": 275, "date": "2024-03-10 14:20:00", "direction": "IN", "from": "380505557182",
            "to": ["2000"], "outerNumber": "380443334455", "secondsFullTime": 19, "secondsTalk": 9,
            "state": "ANSWER", "cause": 16, "link": "https://api.unitalk.cloud:8443/tracking/rec/1531144732.920/2018-07-09"});
        let c = parse_call(&raw, Kyiv).unwrap();
        assert_eq!(c.id, "275");
        assert_eq!(c.direction, Direction::In);
        assert_eq!(c.state, CallState::Answer);
        assert_eq!(c.started_at.to_rfc3339(), "2024-03-10T12:20:00+00:00");
        assert_eq!(c.to, vec!["2000"]);
    }

    #[test]
    fn tolerates_strings_for_numbers_a_bare_to_and_unknown_enums() {
        let raw = json!({"id": "77", "date": "2026-11-22 10:00:00", "direction": "SIDEWAYS", "from": "1",
            "to": "101", "secondsFullTime": "30", "secondsTalk": "12", "state": "TELEPORTED"});
        let c = parse_call(&raw, Kyiv).unwrap();
        assert_eq!(c.to, vec!["101"]);
        assert_eq!(c.seconds_talk, 12);
        assert_eq!(c.direction, Direction::Other("SIDEWAYS".into()));
        assert_eq!(c.state, CallState::Other("TELEPORTED".into()));
    }

    #[test]
    fn unreadable_records_say_why_and_keep_the_raw_json() {
        let e = parse_call(&json!({"id": 5, "date": "yesterday"}), Kyiv).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("5"));
        assert!(e.reason.contains("date"));
        assert!(parse_call(&json!({"date": "2026-11-22 10:00:00"}), Kyiv)
            .unwrap_err()
            .reason
            .contains("id"));
        assert!(parse_call(
            &json!({"id": 1, "date": "2026-11-22 10:00:00", "secondsTalk": [1]}),
            Kyiv
        )
        .is_err());
    }

    #[test]
    fn users_and_lines_accept_several_shapes() {
        let users =
            parse_users(&json!([{"line": 8309, "firstName": "A"}, {"firstName": "no line"}]))
                .unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].line, "8309");
        let users = parse_users(&json!({"data": [{"line": "101"}]})).unwrap();
        assert_eq!(users[0].line, "101");
        let lines = parse_lines(
            &json!({"items": [{"number": "101", "status": "online"}, {"sip": 102, "busy": true}]}),
        )
        .unwrap();
        assert_eq!(lines[0].status, "ONLINE");
        assert_eq!(lines[1].line, "102");
        assert_eq!(lines[1].status, "BUSY");
    }
}
