//! What a Unitalk call means for Bitrix24: its direction, the client's number in E.164, the
//! operator's inner line, the telephony `STATUS_CODE`, whether it is a missed call that needs a
//! task, and a hash of everything Bitrix24 is told. Pure functions over plain data.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::config::SyncConfig;
use crate::rules::{InvalidNumber, Rules};
use crate::unitalk::{Call, CallState, Direction};

/// Incoming or outgoing, from the call centre's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    In,
    Out,
}

/// A call ubsync will push, with everything derived from it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallFacts {
    /// Unitalk `id`.
    pub id: String,
    /// `unitalk-<id>`: `EXTERNAL_CALL_ID` in telephony mode, `ORIGIN_ID` in activity mode.
    pub external_id: String,
    pub way: Way,
    /// The client's number in E.164 (`+380501234567`).
    pub client_number: String,
    /// The operator's inner line: who answered (IN) or dialled (OUT), if known.
    pub operator_line: Option<String>,
    pub started_at: DateTime<Utc>,
    pub seconds_talk: u32,
    pub seconds_full: u32,
    pub state: CallState,
    pub status_code: &'static str,
    pub link: Option<String>,
    /// The company line (Unitalk `outerNumber`, Bitrix24 `LINE_NUMBER`).
    pub line_number: Option<String>,
    /// An incoming call nobody answered: it gets a follow-up task.
    pub missed: bool,
    /// Unitalk `outerNumber` as sent (a phone number, or a site name for web callbacks).
    pub outer: Option<String>,
    /// Unitalk `lastGroupName`, when sent.
    pub group: Option<String>,
}

/// What to do with a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Push(Box<CallFacts>),
    /// Deliberately not pushed (e.g. internal calls); recorded with the reason.
    Skip(String),
    /// Not final yet (`DIALING`): leave it for a later pass.
    NotFinal,
    /// Cannot be pushed; quarantined with the reason.
    Quarantine(String),
}

/// Telephony `STATUS_CODE` for a Unitalk `state` (`bitrix24-api.md` §4.2).
pub fn status_code(state: &CallState) -> &'static str {
    match state {
        CallState::Answer => "200",
        CallState::NoAnswer => "304",
        CallState::Busy | CallState::BusyOut => "486",
        CallState::Fail => "603",
        CallState::ChanUnavail | CallState::Unreachable => "480",
        CallState::NoMoney => "402",
        CallState::WrongDir => "484",
        CallState::Blocked => "423",
        CallState::NotExist => "404",
        CallState::Dialing | CallState::Other(_) => "OTHER",
    }
}

/// Whether `n` can be a company phone line: digits, optionally with `+`, spaces, dashes or
/// brackets, at least five digits.
pub fn is_phone_like(n: &str) -> bool {
    let n = n.trim();
    let digits = n.chars().filter(char::is_ascii_digit).count();
    digits >= 5
        && n.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '+' | ' ' | '-' | '(' | ')'))
}

/// Whether `n` looks like an inner line: a known operator line, or a short all-digit number
/// (the test for a record whose direction does not say which side is the client).
pub fn is_inner(n: &str, known_lines: &HashSet<String>) -> bool {
    let n = n.trim();
    known_lines.contains(n)
        || (!n.is_empty() && n.len() <= 5 && n.chars().all(|c| c.is_ascii_digit()))
}

/// A client number in E.164, read with `country` when it has no international prefix.
pub fn normalize_phone(raw: &str, country: phonenumber::country::Id) -> Result<String, String> {
    let cleaned: String = raw
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '+')
        .collect();
    let digits = cleaned.trim_start_matches('+');
    if digits.len() < 5 {
        return Err(format!("client number {raw:?} is not a phone number"));
    }
    let e164 = |n: &phonenumber::PhoneNumber| n.format().mode(phonenumber::Mode::E164).to_string();
    if cleaned.starts_with('+') {
        return phonenumber::parse(None, &cleaned)
            .map(|n| e164(&n))
            .map_err(|e| format!("client number {raw:?} is not a phone number ({e})"));
    }
    let national = phonenumber::parse(Some(country), digits).ok();
    if let Some(n) = national.as_ref().filter(|n| phonenumber::is_valid(n)) {
        return Ok(e164(n));
    }
    if let Some(n) = phonenumber::parse(None, format!("+{digits}"))
        .ok()
        .filter(phonenumber::is_valid)
    {
        return Ok(e164(&n));
    }
    // Numbering plans change faster than metadata: accept a number that parses at all.
    national
        .map(|n| e164(&n))
        .ok_or_else(|| format!("client number {raw:?} is not a phone number"))
}

/// Decides what to do with `call`. `known_lines` are the operators' inner lines; `rules` rewrite
/// the client number and say what happens when it cannot be read (skip filters apply later, to
/// calls not pushed yet).
pub fn classify(
    call: &Call,
    known_lines: &HashSet<String>,
    cfg: &SyncConfig,
    rules: &Rules,
) -> Disposition {
    if call.state == CallState::Dialing {
        return Disposition::NotFinal;
    }
    // Two tests of a number: `known` is an operator's line (Unitalk's `/users/list`), or too
    // short (4 digits or fewer) for any outside number; `inner` is that or any 5-digit number.
    // Where the record states its direction, the other side is the client unless `known`, so a
    // 5-digit service number (`74321`) calling in, or called, is a client. Only a record
    // without a usable direction is read by length alone.
    let inner = |n: &str| is_inner(n, known_lines);
    let known = |n: &str| {
        let n = n.trim();
        known_lines.contains(n)
            || (!n.is_empty() && n.len() <= 4 && n.chars().all(|c| c.is_ascii_digit()))
    };
    let stated = matches!(call.direction, Direction::In | Direction::Out);
    let outside = |n: &str| if stated { !known(n) } else { !inner(n) };
    let external_to: Vec<&String> = call.to.iter().filter(|t| outside(t)).collect();
    let internal = match &call.direction {
        Direction::Inner => true,
        Direction::In => known(&call.from) && !call.to.is_empty() && external_to.is_empty(),
        _ => inner(&call.from) && !call.to.is_empty() && external_to.is_empty(),
    };
    if internal {
        if cfg.skip_internal {
            return Disposition::Skip(format!(
                "internal call: {} to {} are inner lines (sync.skip_internal = true)",
                if call.from.is_empty() {
                    "?"
                } else {
                    &call.from
                },
                call.to.join(", ")
            ));
        }
        // Pushed as an outgoing call to the other extension.
        let other = call.to.first().cloned().unwrap_or_default();
        return facts(
            call,
            Way::Out,
            other,
            Some(call.from.clone()).filter(|f| !f.is_empty()),
        );
    }
    if call.state == CallState::Other(String::new()) {
        return Disposition::Quarantine(
            "the record has no `state` and no talk time: its outcome is unknown".into(),
        );
    }
    let way = match &call.direction {
        Direction::In => Way::In,
        Direction::Out => Way::Out,
        Direction::Inner => unreachable!("handled above"),
        Direction::Other(d) => {
            if inner(&call.from) && !external_to.is_empty() {
                Way::Out
            } else if !call.from.is_empty() && !inner(&call.from) {
                Way::In
            } else {
                return Disposition::Quarantine(format!(
                    "unknown direction {d:?} and the numbers do not tell"
                ));
            }
        }
    };
    let (client_raw, operator) = match way {
        Way::In => (
            call.from.clone(),
            call.to
                .iter()
                .find(|t| known_lines.contains(t.as_str()))
                .or(call.to.iter().find(|t| inner(t)))
                .cloned(),
        ),
        Way::Out => (
            external_to
                .first()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            Some(call.from.clone()).filter(|f| inner(f)),
        ),
    };
    let operator = operator.map(|l| rules.rewrite_inner(&l));
    let mut client_raw = rules.rewrite_client(&client_raw);
    if let Some(script) = &rules.script {
        // The call as the script sees it, before its number is read.
        let mut draft = CallFacts {
            id: call.id.clone(),
            external_id: format!("unitalk-{}", call.id),
            way,
            client_number: client_raw.clone(),
            operator_line: operator.clone(),
            started_at: call.started_at,
            seconds_talk: call.seconds_talk,
            seconds_full: call.seconds_full,
            state: call.state.clone(),
            status_code: status_code(&call.state),
            link: call.link.clone(),
            line_number: None,
            missed: way == Way::In && call.state != CallState::Answer,
            outer: call.outer_number.clone(),
            group: call.group.clone(),
        };
        draft.line_number = draft.outer.clone().filter(|n| is_phone_like(n));
        let map = crate::rules::script::call_map(&draft, Some(&call.raw));
        match script.client_number(&map, &client_raw) {
            Ok(n) => client_raw = n,
            Err(e) => return Disposition::Quarantine(e),
        }
    }
    match normalize_phone(&client_raw, cfg.default_country) {
        Ok(number) => facts(call, way, number, operator),
        Err(reason) => match rules.invalid_number {
            InvalidNumber::Quarantine => Disposition::Quarantine(reason),
            InvalidNumber::Skip => {
                Disposition::Skip(format!("{reason} (rules.invalid_number = \"skip\")"))
            }
            InvalidNumber::Raw => {
                let raw: String = client_raw
                    .chars()
                    .filter(|c| c.is_ascii_digit() || *c == '+')
                    .collect();
                if raw.is_empty() {
                    Disposition::Quarantine(reason)
                } else {
                    facts(call, way, raw, operator)
                }
            }
        },
    }
}

fn facts(
    call: &Call,
    way: Way,
    client_number: String,
    operator_line: Option<String>,
) -> Disposition {
    Disposition::Push(Box::new(CallFacts {
        id: call.id.clone(),
        external_id: format!("unitalk-{}", call.id),
        way,
        client_number,
        operator_line,
        started_at: call.started_at,
        seconds_talk: call.seconds_talk,
        seconds_full: call.seconds_full,
        status_code: status_code(&call.state),
        missed: way == Way::In && call.state != CallState::Answer,
        state: call.state.clone(),
        link: call.link.clone(),
        // `outerNumber` can be a site name ("site.ua" for web callbacks): only a phone number
        // is a line Bitrix24 knows.
        line_number: call.outer_number.clone().filter(|n| is_phone_like(n)),
        outer: call.outer_number.clone(),
        group: call.group.clone(),
    }))
}

/// Hash of every field of a call that reaches Bitrix24; a change means follow-ups may be due.
pub fn content_hash(call: &Call) -> String {
    let mut h = Sha256::new();
    for part in [
        call.direction.as_str(),
        &call.from,
        &call.to.join(","),
        call.outer_number.as_deref().unwrap_or(""),
        &call.started_at.to_rfc3339(),
        &call.seconds_talk.to_string(),
        &call.seconds_full.to_string(),
        call.state.as_str(),
        call.link.as_deref().unwrap_or(""),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_phone_numbers_are_lines() {
        for n in ["380443334455", "+380 44 333-44-55", "(044) 333 4455"] {
            assert!(is_phone_like(n), "{n}");
        }
        for n in ["site.ua", "https://site.ua", "1234", "", "web-callback"] {
            assert!(!is_phone_like(n), "{n}");
        }
    }
    use crate::unitalk::wire::parse_call;
    use serde_json::json;

    fn cfg() -> SyncConfig {
        crate::config::Config::parse(
            "[unitalk]\napi_key=\"k\"\n[bitrix24]\nmode=\"activity\"\nwebhook_url=\"https://p/rest/1/x/\"\n",
            std::path::Path::new("/x.toml"),
            &Default::default(),
        )
        .unwrap()
        .sync
    }

    fn call(v: serde_json::Value) -> Call {
        parse_call(&v, chrono_tz::Europe::Kyiv).unwrap()
    }

    fn lines() -> HashSet<String> {
        ["101", "102"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_unitalk_state_maps_to_its_status_code() {
        let table = [
            ("ANSWER", "200"),
            ("NOANSWER", "304"),
            ("BUSY", "486"),
            ("BUSYOUT", "486"),
            ("FAIL", "603"),
            ("CHANUNAVAIL", "480"),
            ("UNREACHABLE", "480"),
            ("NOMONEY", "402"),
            ("WRONGDIR", "484"),
            ("BLOCKED", "423"),
            ("NOT_EXIST", "404"),
            ("SOMETHING_NEW", "OTHER"),
        ];
        for (state, code) in table {
            let c = call(
                json!({"id": 1, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": state}),
            );
            let Disposition::Push(f) = classify(&c, &lines(), &cfg(), &Rules::default()) else {
                panic!("{state}")
            };
            assert_eq!(f.status_code, code, "{state}");
            assert_eq!(f.missed, state != "ANSWER");
        }
    }

    #[test]
    fn dialing_is_not_final_and_internal_calls_are_skipped() {
        let c = call(
            json!({"id": 1, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "380501112233", "state": "DIALING"}),
        );
        assert_eq!(
            classify(&c, &lines(), &cfg(), &Rules::default()),
            Disposition::NotFinal
        );
        let c = call(
            json!({"id": 2, "date": "2026-11-22 10:00:00", "direction": "OUT", "from": "101", "to": ["102"], "state": "ANSWER"}),
        );
        assert!(matches!(
            classify(&c, &lines(), &cfg(), &Rules::default()),
            Disposition::Skip(_)
        ));
        let c = call(
            json!({"id": 3, "date": "2026-11-22 10:00:00", "direction": "INNER", "from": "101", "to": ["102"], "state": "ANSWER"}),
        );
        assert!(matches!(
            classify(&c, &lines(), &cfg(), &Rules::default()),
            Disposition::Skip(_)
        ));
    }

    #[test]
    fn a_five_digit_client_number_is_a_client_where_the_record_says_which_side_it_is() {
        // A service number calls in: the record says IN, and 74321 is no operator's line.
        let c = call(
            json!({"id": 5, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "74321", "to": ["101"], "state": "NOANSWER"}),
        );
        let Disposition::Push(f) = classify(&c, &lines(), &cfg(), &Rules::default()) else {
            panic!("an incoming call from a short number is not internal")
        };
        assert_eq!(f.way, Way::In);
        assert!(f.client_number.ends_with("74321"), "{}", f.client_number);
        assert_eq!(f.operator_line.as_deref(), Some("101"));
        assert!(f.missed);
        // An operator dials it.
        let c = call(
            json!({"id": 6, "date": "2026-11-22 10:00:00", "direction": "OUT", "from": "102", "to": ["74321"], "state": "ANSWER"}),
        );
        let Disposition::Push(f) = classify(&c, &lines(), &cfg(), &Rules::default()) else {
            panic!("an outgoing call to a short number is not internal")
        };
        assert_eq!(f.way, Way::Out);
        assert!(f.client_number.ends_with("74321"), "{}", f.client_number);
        assert_eq!(f.operator_line.as_deref(), Some("102"));
        // With skip_internal off, still the right way round (never an outgoing call to the line).
        let mut keep = cfg();
        keep.skip_internal = false;
        let c = call(
            json!({"id": 7, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "74321", "to": ["101"], "state": "ANSWER"}),
        );
        let Disposition::Push(f) = classify(&c, &lines(), &keep, &Rules::default()) else {
            panic!()
        };
        assert_eq!(f.way, Way::In);
        // Without a direction, length still decides: 101 calling 74321 is internal.
        let c = call(
            json!({"id": 8, "date": "2026-11-22 10:00:00", "direction": "", "from": "101", "to": ["74321"], "state": "ANSWER"}),
        );
        let Disposition::Skip(why) = classify(&c, &lines(), &cfg(), &Rules::default()) else {
            panic!()
        };
        assert!(why.contains("101 to 74321"), "{why}");
        // A stated IN from a known line to a known line is internal, and says which lines.
        let c = call(
            json!({"id": 9, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "101", "to": ["102"], "state": "ANSWER"}),
        );
        assert!(matches!(
            classify(&c, &lines(), &cfg(), &Rules::default()),
            Disposition::Skip(_)
        ));
    }

    #[test]
    fn outgoing_calls_take_the_client_from_to_and_the_operator_from_from() {
        let c = call(
            json!({"id": 4, "date": "2026-11-22 10:00:00", "direction": "OUT", "from": "102", "to": ["0501112233"], "state": "ANSWER"}),
        );
        let Disposition::Push(f) = classify(&c, &lines(), &cfg(), &Rules::default()) else {
            panic!()
        };
        assert_eq!(f.way, Way::Out);
        assert_eq!(
            f.client_number, "+380501112233",
            "national numbers are read as UA"
        );
        assert_eq!(f.operator_line.as_deref(), Some("102"));
        assert!(!f.missed);
    }

    #[test]
    fn numbers_normalize_to_e164_and_garbage_is_quarantined() {
        let ua = phonenumber::country::Id::UA;
        assert_eq!(
            normalize_phone("380505557182", ua).unwrap(),
            "+380505557182"
        );
        assert_eq!(
            normalize_phone("+48 22 123 45 67", ua).unwrap(),
            "+48221234567"
        );
        assert_eq!(
            normalize_phone("(050) 555-71-82", ua).unwrap(),
            "+380505557182"
        );
        assert!(normalize_phone("anonymous", ua).is_err());
        let c = call(
            json!({"id": 5, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "unknown", "to": ["101"], "state": "ANSWER"}),
        );
        assert!(matches!(
            classify(&c, &lines(), &cfg(), &Rules::default()),
            Disposition::Quarantine(_)
        ));
    }

    #[test]
    fn an_unknown_direction_is_inferred_from_the_numbers() {
        let c = call(
            json!({"id": 6, "date": "2026-11-22 10:00:00", "direction": "CALLBACK", "from": "101", "to": ["380501112233"], "state": "ANSWER"}),
        );
        let Disposition::Push(f) = classify(&c, &lines(), &cfg(), &Rules::default()) else {
            panic!()
        };
        assert_eq!(f.way, Way::Out);
    }

    #[test]
    fn the_content_hash_changes_when_a_recording_appears() {
        let a = call(
            json!({"id": 7, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": "ANSWER", "secondsTalk": 5}),
        );
        let mut b = a.clone();
        b.link = Some("https://rec/7".into());
        assert_ne!(content_hash(&a), content_hash(&b));
        assert_eq!(content_hash(&a), content_hash(&a.clone()));
    }
}
