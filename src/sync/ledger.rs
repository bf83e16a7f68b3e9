//! Every ledger transition, pure: a batch's outcome (or a failure) and a call's ledger row →
//! its next row. `Stage` moves only here: `pending → in_flight → registered → finished → done`,
//! with `quarantined` for permanent failures and retries counted with backoff. The probes
//! (`probe.rs`) and the claim of a click (`clicks.rs`) are the other writers of stages; both
//! only set what Bitrix24 proved.

use chrono::{DateTime, Duration, Utc};

use super::call::CallFacts;
use super::plan::{
    attached, key, needs_recording, needs_task, record_url_in_finish, Portal, MAX_ATTEMPTS,
};
use crate::bitrix24::api::telephony::CallRecord;
use crate::bitrix24::wire::{as_i64, BatchOutcome, ErrorBody};
use crate::config::Config;
use crate::store::ledger::{LedgerRow, Stage};
/// How a failed command should be handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// May succeed later: retry on a later pass with backoff.
    Retry(String),
    /// Will not succeed as sent: quarantine with this text.
    Permanent(String),
    /// Not the call's fault (a rate or operating limit, a method the portal refuses inside a
    /// batch): try again without counting an attempt.
    Deferred(String),
    /// Credentials, scopes or the plan are wrong: nothing can succeed until an admin acts; the
    /// pass stops.
    Fatal(String),
}

/// Error codes that stop the pass: an admin must act (see `bitrix24::auth_hint`).
pub fn is_fatal_code(code: &str) -> bool {
    matches!(
        code,
        "WRONG_AUTH_TYPE"
            | "insufficient_scope"
            | "invalid_scope"
            | "NO_AUTH_FOUND"
            | "PAYMENT_REQUIRED"
            | "invalid_grant"
            | "invalid_client"
            | "wrong_client"
            | "user_access_error"
            | "METHOD_CONFIRM_WAITING"
            | "OVERLOAD_LIMIT"
            | "PORTAL_DELETED"
            | "INVALID_CREDENTIALS"
    )
}

/// Classifies one command's error (`bitrix24-api.md` §9).
pub fn classify_error(method: &str, e: &ErrorBody) -> Failure {
    let code = e.effective_code();
    let text = format!(
        "{method}: {}{}{}",
        e.code,
        if e.code.is_empty() { "" } else { ": " },
        e.description
    );
    let d = e.description.to_lowercase();
    if is_fatal_code(&code) {
        return Failure::Fatal(text);
    }
    if matches!(
        code.as_str(),
        "QUERY_LIMIT_EXCEEDED" | "OPERATION_TIME_LIMIT" | "ERROR_BATCH_METHOD_NOT_ALLOWED"
    ) {
        return Failure::Deferred(text);
    }
    let transient_codes = [
        "QUERY_LIMIT_EXCEEDED",
        "OPERATION_TIME_LIMIT",
        "INTERNAL_SERVER_ERROR",
        "ERROR_UNEXPECTED_ANSWER",
        "expired_token",
        "invalid_token",
    ];
    if transient_codes.contains(&code.as_str())
        || d.contains("database error")
        || d.contains("server returns http error")
        || code == "CALL_NOT_FOUND"
    {
        return Failure::Retry(text);
    }
    let permanent = d.contains("phone number")
        || d.contains("user is not found")
        || d.contains("unknown type")
        || d.contains("iso-8601")
        || d.contains("should be set")
        || d.contains("not defined")
        || d.contains("responsible")
        || d.contains("wrong file extension")
        || d.contains("could not build binding")
        || matches!(
            code.as_str(),
            "INVALID_ARGUMENT"
                | "ERROR_ARGUMENT"
                | "INVALID_ARG_VALUE"
                | "NOT_FOUND"
                | "ERROR_NOT_FOUND"
                | "ACCESS_DENIED"
        );
    if permanent {
        Failure::Permanent(text)
    } else {
        // Unknown problems are retried; MAX_ATTEMPTS turns a persistent one into quarantine.
        Failure::Retry(text)
    }
}

/// A command succeeded: the retry state of earlier failures no longer applies.
fn clear_failures(l: &mut LedgerRow) {
    l.attempts = 0;
    l.last_error = None;
    l.next_attempt_at = None;
}

/// Applies a failure to a row: backoff for retryable ones (quarantine after [`MAX_ATTEMPTS`]),
/// quarantine for permanent ones. Returns the reason when the row is quarantined.
pub fn fail(mut l: LedgerRow, failure: Failure, now: DateTime<Utc>) -> (LedgerRow, Option<String>) {
    l.in_flight_since = None;
    if let Failure::Deferred(text) | Failure::Fatal(text) = failure {
        l.last_error = Some(text);
        return (l, None);
    }
    l.attempts += 1;
    match failure {
        Failure::Retry(text) if l.attempts < MAX_ATTEMPTS => {
            let minutes = 1i64 << (l.attempts - 1).min(8);
            let jitter = (rand::random::<u64>() % 30) as i64;
            l.next_attempt_at = Some(now + Duration::minutes(minutes) + Duration::seconds(jitter));
            l.last_error = Some(text);
            (l, None)
        }
        Failure::Deferred(_) | Failure::Fatal(_) => unreachable!("handled above"),
        Failure::Retry(text) | Failure::Permanent(text) => {
            let reason = if l.attempts >= MAX_ATTEMPTS {
                format!("{text} (after {} attempts)", l.attempts)
            } else {
                text
            };
            l.last_error = Some(reason.clone());
            l.reason = Some(reason.clone());
            l.stage = Stage::Quarantined;
            l.next_attempt_at = None;
            (l, Some(reason))
        }
    }
}

/// Takes the CRM entity Bitrix24 bound the call to, when it names one.
pub fn take_entity(l: &mut LedgerRow, rec: &CallRecord) {
    if let Some(e) = &rec.entity {
        l.crm_entity_type = Some(e.kind.clone());
        l.crm_entity_id = Some(e.id);
    }
}

/// Whether anything is still due for a call whose main record is in Bitrix24.
pub fn settle_stage(cfg: &Config, f: &CallFacts, mut l: LedgerRow, hash: &str) -> LedgerRow {
    l.client = Some(f.client_number.clone());
    l.reached = f.state == crate::unitalk::CallState::Answer;
    if needs_activity_refresh(cfg, &l, hash) {
        // The activity still shows older content; keep the row until it is updated.
        l.stage = Stage::Finished;
        return l;
    }
    let recording_due = needs_recording(f, &l);
    l.stage = if recording_due || needs_task(cfg, f, &l) {
        Stage::Finished
    } else {
        Stage::Done
    };
    l.pushed_hash = Some(hash.to_string());
    l
}

/// Activity mode: whether the call changed (a corrected duration, a new link) since its activity
/// was written, so the activity needs an update. Telephony cannot update a finished call.
pub fn needs_activity_refresh(cfg: &Config, l: &LedgerRow, hash: &str) -> bool {
    cfg.bitrix24.mode == crate::config::Mode::Activity
        && l.b24_activity_id.is_some()
        && l.pushed_hash.as_deref().is_some_and(|h| h != hash)
}

/// The ledger row after a telephony chain's batch came back. Returns the row and, when the call
/// is quarantined, the reason.
pub fn record_chain(
    cfg: &Config,
    portal: Portal,
    f: &CallFacts,
    mut l: LedgerRow,
    out: &BatchOutcome,
    hash: &str,
    now: DateTime<Utc>,
) -> (LedgerRow, Option<String>) {
    let (r, fk, a) = (key("r", &f.id), key("f", &f.id), key("a", &f.id));
    l.in_flight_since = None;
    if let Some(res) = out.results.get(&r) {
        let rec = CallRecord::decode(res);
        take_entity(&mut l, &rec);
        l.b24_call_id = rec.call_id;
        l.stage = Stage::Registered;
    } else if let Some(e) = out.errors.get(&r) {
        l.stage = if l.b24_call_id.is_some() {
            Stage::Registered
        } else {
            Stage::Pending
        };
        return fail(l, classify_error("telephony.externalCall.register", e), now);
    }
    if let Some(res) = out.results.get(&fk) {
        let rec = CallRecord::decode(res);
        take_entity(&mut l, &rec);
        l.b24_stat_id = rec.stat_id;
        l.b24_activity_id = rec.activity_id;
        if rec.call_id.is_some() {
            l.b24_call_id = rec.call_id;
        }
        if record_url_in_finish(cfg, f, portal) {
            // Unproven: Bitrix24 reports no error when its download fails.
            l.record_url = f.link.clone();
            l.record_check_at = Some(now + super::secs(cfg.sync.record_check_after));
        }
        l.stage = Stage::Finished;
    } else if let Some(e) = out.errors.get(&fk) {
        return fail(l, classify_error("telephony.externalCall.finish", e), now);
    }
    if let Some(res) = out.results.get(&a) {
        match attached(res) {
            Ok(()) => {
                l.record_url = f.link.clone();
                l.record_check_at = None;
            }
            Err(why) => {
                return fail(l, Failure::Retry(why), now);
            }
        }
    } else if let Some(e) = out.errors.get(&a) {
        let (row, reason) = fail(
            l,
            classify_error("telephony.externalCall.attachRecord", e),
            now,
        );
        return (row, reason);
    }
    if matches!(l.stage, Stage::Finished | Stage::Done) {
        clear_failures(&mut l);
        l = settle_stage(cfg, f, l, hash);
    }
    (l, None)
}

/// The ledger row after an activity-mode `crm.activity.add` came back.
pub fn record_activity(
    cfg: &Config,
    f: &CallFacts,
    mut l: LedgerRow,
    out: &BatchOutcome,
    hash: &str,
    now: DateTime<Utc>,
) -> (LedgerRow, Option<String>) {
    let v = key("v", &f.id);
    l.in_flight_since = None;
    if let Some(res) = out.results.get(&v) {
        l.b24_activity_id = as_i64(res);
        l.stage = Stage::Finished;
        clear_failures(&mut l);
        l.record_url = f.link.clone();
        return (settle_stage(cfg, f, l, hash), None);
    }
    match out.errors.get(&v) {
        Some(e) => match classify_error("crm.activity.add", e) {
            // An internal error is no proof that nothing was written: the probe (by ORIGIN_ID)
            // looks first.
            Failure::Retry(text) if l.attempts + 1 < MAX_ATTEMPTS => {
                l.attempts += 1;
                l.last_error = Some(text);
                l.stage = Stage::InFlight;
                l.in_flight_since = Some(now);
                (l, None)
            }
            other => {
                l.stage = Stage::Pending;
                fail(l, other, now)
            }
        },
        None => (l, None),
    }
}

/// The ledger row after an activity's description update came back.
pub fn record_activity_update(
    cfg: &Config,
    f: &CallFacts,
    mut l: LedgerRow,
    out: &BatchOutcome,
    hash: &str,
    now: DateTime<Utc>,
) -> (LedgerRow, Option<String>) {
    let u = key("u", &f.id);
    if out.results.contains_key(&u) {
        l.record_url = f.link.clone();
        l.pushed_hash = Some(hash.to_string());
        return (settle_stage(cfg, f, l, hash), None);
    }
    match out.errors.get(&u) {
        Some(e) => fail(l, classify_error("crm.activity.update", e), now),
        None => (l, None),
    }
}

/// The ledger row after a missed-call task's batch came back.
pub fn record_task(
    cfg: &Config,
    f: &CallFacts,
    mut l: LedgerRow,
    out: &BatchOutcome,
    hash: &str,
    now: DateTime<Utc>,
) -> (LedgerRow, Option<String>) {
    let t = key("t", &f.id);
    let sent = l.task_in_flight_since;
    l.task_in_flight_since = None;
    if let Some(res) = out.results.get(&t) {
        l.task_id = crate::bitrix24::api::tasks::task_id(res);
        if l.task_id.is_none() {
            // A result is a created task, but without its id: find it, never add it again.
            l.task_in_flight_since = sent.or(Some(now));
            return (l, None);
        }
        clear_failures(&mut l);
        return (settle_stage(cfg, f, l, hash), None);
    }
    match out.errors.get(&t) {
        Some(e) => match classify_error("tasks.task.add", e) {
            // An internal error is no proof that nothing was created: the probe looks first.
            Failure::Retry(text) if l.attempts + 1 < MAX_ATTEMPTS => {
                l.attempts += 1;
                l.last_error = Some(text);
                l.task_in_flight_since = sent.or(Some(now));
                (l, None)
            }
            other => fail(l, other, now),
        },
        None => (l, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::call::{classify, Disposition};
    use serde_json::{json, Value};
    use std::collections::HashSet;

    const PORTAL: Portal = Portal {
        attach_in_batch: true,
        finish_takes_link: true,
    };

    fn cfg() -> Config {
        crate::config::Config::parse(
            "[unitalk]\napi_key=\"k\"\n[bitrix24]\nmode=\"activity\"\nwebhook_url=\"https://p/rest/1/x/\"\ndefault_user_id = 1\n",
            std::path::Path::new("/x.toml"),
            &Default::default(),
        )
        .unwrap()
    }

    fn facts(state: &str, link: Option<&str>) -> CallFacts {
        let mut v = json!({"id": 7, "date": "2026-11-22 10:00:00", "direction": "IN", "from": "380501112233", "to": ["101"], "state": state, "secondsTalk": if state == "ANSWER" { 30 } else { 0 }});
        if let Some(l) = link {
            v["link"] = json!(l);
        }
        let call = crate::unitalk::wire::parse_call(&v, chrono_tz::Europe::Kyiv).unwrap();
        let lines: HashSet<String> = ["101".to_string()].into();
        match classify(&call, &lines, &cfg().sync, &Default::default()) {
            Disposition::Push(f) => *f,
            other => panic!("{other:?}"),
        }
    }

    fn err(code: &str, text: &str) -> ErrorBody {
        ErrorBody {
            code: code.into(),
            description: text.into(),
        }
    }

    fn outcome(results: &[(&str, Value)], errors: &[(&str, ErrorBody)]) -> BatchOutcome {
        BatchOutcome {
            results: results
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            errors: errors
                .iter()
                .map(|(k, e)| (k.to_string(), e.clone()))
                .collect(),
            ..Default::default()
        }
    }

    /// (what came back, the row before, the stage after, whether a recording is recorded, attempts)
    #[test]
    fn every_chain_outcome_moves_the_row_to_its_stage() {
        let mut cfg = cfg();
        cfg.sync.record_url_on_finish = false;
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let missed = facts("NOANSWER", None);
        let answered = facts("ANSWER", Some("https://rec/7.mp3"));
        let registered = LedgerRow {
            stage: Stage::Registered,
            b24_call_id: Some("externalCall.1".into()),
            ..LedgerRow::pending("7")
        };
        let cases: Vec<(&str, &CallFacts, LedgerRow, BatchOutcome, Stage, bool, i64)> = vec![
            (
                "register + finish: a missed call waits for its task",
                &missed,
                LedgerRow::pending("7"),
                outcome(
                    &[
                        ("r_7", json!({"CALL_ID": "externalCall.1"})),
                        ("f_7", json!({"ID": 5})),
                    ],
                    &[],
                ),
                Stage::Finished,
                false,
                0,
            ),
            (
                "register + finish + attachRecord: nothing left",
                &answered,
                LedgerRow::pending("7"),
                outcome(
                    &[
                        ("r_7", json!({"CALL_ID": "externalCall.1"})),
                        ("f_7", json!({"ID": 5})),
                        ("a_7", json!({"FILE_ID": 9})),
                    ],
                    &[],
                ),
                Stage::Done,
                true,
                0,
            ),
            (
                "register refused for a retryable reason: pending, one attempt counted",
                &missed,
                LedgerRow::pending("7"),
                outcome(
                    &[],
                    &[("r_7", err("INTERNAL_SERVER_ERROR", "Internal error"))],
                ),
                Stage::Pending,
                false,
                1,
            ),
            (
                "register refused for good: quarantined",
                &missed,
                LedgerRow::pending("7"),
                outcome(
                    &[],
                    &[("r_7", err("ERROR_CORE", "Unsupported phone number format"))],
                ),
                Stage::Quarantined,
                false,
                1,
            ),
            (
                "finish only, after an earlier register",
                &answered,
                registered.clone(),
                outcome(&[("f_7", json!({"ID": 5}))], &[]),
                Stage::Finished,
                false,
                0,
            ),
            (
                "no answer for any command: the row stays as it was",
                &missed,
                registered.clone(),
                outcome(&[], &[]),
                Stage::Registered,
                false,
                0,
            ),
            (
                "attachRecord answered without a file: finished, retried",
                &answered,
                registered,
                outcome(
                    &[
                        ("f_7", json!({"ID": 5})),
                        ("a_7", json!({"uploadUrl": "https://p/u"})),
                    ],
                    &[],
                ),
                Stage::Finished,
                false,
                1,
            ),
        ];
        for (what, f, before, out, stage, recorded, attempts) in cases {
            let (row, _) = record_chain(&cfg, PORTAL, f, before, &out, "h", now);
            assert_eq!(row.stage, stage, "{what}: {row:?}");
            assert_eq!(row.record_url.is_some(), recorded, "{what}");
            assert_eq!(row.attempts, attempts, "{what}");
            assert!(
                row.in_flight_since.is_none(),
                "{what}: never left in flight by an answer"
            );
            assert!(
                row.record_check_at.is_none(),
                "{what}: attachRecord proves itself"
            );
        }
    }

    #[test]
    fn a_link_sent_in_finish_is_recorded_but_unproven() {
        let cfg = cfg();
        assert!(cfg.sync.record_url_on_finish, "the default");
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let answered = facts("ANSWER", Some("https://rec/7.mp3"));
        let out = outcome(
            &[
                ("r_7", json!({"CALL_ID": "externalCall.1"})),
                ("f_7", json!({"ID": 5})),
            ],
            &[],
        );
        let (row, reason) = record_chain(
            &cfg,
            PORTAL,
            &answered,
            LedgerRow::pending("7"),
            &out,
            "h",
            now,
        );
        assert_eq!(reason, None);
        assert_eq!(row.stage, Stage::Done);
        assert_eq!(row.record_url.as_deref(), Some("https://rec/7.mp3"));
        assert_eq!(
            row.record_check_at,
            Some(now),
            "checked in the same pass by default"
        );
        // A finish that failed leaves nothing to check.
        let out = outcome(
            &[("r_7", json!({"CALL_ID": "externalCall.1"}))],
            &[("f_7", err("INTERNAL_SERVER_ERROR", "Internal error"))],
        );
        let (row, _) = record_chain(
            &cfg,
            PORTAL,
            &answered,
            LedgerRow::pending("7"),
            &out,
            "h",
            now,
        );
        assert_eq!(row.record_url, None);
        assert_eq!(row.record_check_at, None);
    }

    #[test]
    fn a_task_outcome_is_recorded_found_again_or_retried_never_added_twice() {
        let cfg = cfg();
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let f = facts("NOANSWER", None);
        let sent = LedgerRow {
            stage: Stage::Finished,
            task_in_flight_since: Some(now),
            ..LedgerRow::pending("7")
        };
        let (row, _) = record_task(
            &cfg,
            &f,
            sent.clone(),
            &outcome(&[("t_7", json!({"task": {"id": "31"}}))], &[]),
            "h",
            now,
        );
        assert_eq!((row.task_id, row.stage), (Some(31), Stage::Done));
        assert!(row.task_in_flight_since.is_none());
        let (row, _) = record_task(
            &cfg,
            &f,
            sent.clone(),
            &outcome(&[("t_7", json!({"task": {}}))], &[]),
            "h",
            now,
        );
        assert!(
            row.task_id.is_none() && row.task_in_flight_since.is_some(),
            "a task without its id is looked up"
        );
        let (row, _) = record_task(
            &cfg,
            &f,
            sent.clone(),
            &outcome(&[], &[("t_7", err("INTERNAL_SERVER_ERROR", "x"))]),
            "h",
            now,
        );
        assert!(
            row.task_in_flight_since.is_some() && row.attempts == 1,
            "an internal error is looked up first"
        );
        // (A batch answer without this task's key never reaches `record_task`: `send_plans`
        // keeps the row in flight for the probe.)
        let _ = sent;
    }
}
