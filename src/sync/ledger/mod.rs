//! Every ledger transition, pure: a batch's outcome (or a failure) and a call's ledger row →
//! its next row. `Stage` moves only here: `pending → in_flight → registered → finished → done`,
//! with `quarantined` for permanent failures and retries counted with backoff. A call found in
//! the statistics (`found_in_statistics`: the probes, verify-first) takes only what Bitrix24
//! proved; the claim of a click (`clicks.rs`) and the recording checks (the store's
//! `settle_record_checks`) are the other writers of stages, and set only what Bitrix24 proved.

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
fn take_entity(l: &mut LedgerRow, rec: &CallRecord) {
    if let Some(e) = &rec.entity {
        l.crm_entity_type = Some(e.kind.clone());
        l.crm_entity_id = Some(e.id);
    }
}

/// The row of a call found in the call statistics (the in-flight probe, the verify-first
/// listing): `finished`, with its ids, its CRM entity and its recording. A file proves the
/// recording; a URL alone is what finish was given, so the link is kept unproven and checked
/// from `check_at` (`record_check.rs`).
pub fn found_in_statistics(
    mut l: LedgerRow,
    rec: &CallRecord,
    link: Option<String>,
    check_at: DateTime<Utc>,
) -> LedgerRow {
    take_entity(&mut l, rec);
    l.b24_call_id = rec.call_id.clone().or(l.b24_call_id);
    l.b24_stat_id = rec.stat_id;
    l.b24_activity_id = rec.activity_id;
    if rec.record_file || rec.record_url {
        l.record_check_at = (!rec.record_file && link.is_some()).then_some(check_at);
        l.record_url = link;
    }
    l.stage = Stage::Finished;
    l
}

/// A call whose activity is not written (`why`: no CRM entity and no lead for it). A missed call
/// that needs its task still gets it: the row is `Finished` with a `NO_ACTIVITY` reason, so the
/// task round takes it (bound to no entity); any other call is `Skipped`.
pub fn without_activity(
    cfg: &Config,
    f: &CallFacts,
    mut l: LedgerRow,
    hash: &str,
    why: String,
) -> LedgerRow {
    if needs_task(cfg, f, &l) {
        l.stage = Stage::Finished;
        l.reason = Some(format!(
            "{}{why}; the missed call's task is still made",
            crate::store::ledger::NO_ACTIVITY
        ));
        l.client = Some(f.client_number.clone());
        l.reached = false;
        l.pushed_hash = Some(hash.to_string());
    } else {
        l.stage = Stage::Skipped;
        l.reason = Some(why);
    }
    l
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
mod tests;
