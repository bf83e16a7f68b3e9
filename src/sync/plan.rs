//! From calls and ledger rows to Bitrix24 commands, and from command outcomes back to ledger rows.
//!
//! Pure functions: given a call's facts, its ledger row and what lookups found, [`main_chain`]
//! says which commands the call still needs (never a second `register` once one is
//! acknowledged), [`pack`] puts whole chains into batches of at most 50 commands, and
//! [`record_chain`] / [`record_task`] turn a batch outcome into the call's next ledger row,
//! classifying each failure as retryable or permanent.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use super::call::{CallFacts, Way};
use crate::bitrix24::api::{self, telephony::CallRef};
use crate::bitrix24::batch::{Command, MAX_COMMANDS};
use crate::config::Config;
use crate::store::ledger::{LedgerRow, Stage};
use crate::timezone::rfc3339_in;

/// Failures before a retryable problem is quarantined instead.
pub const MAX_ATTEMPTS: i64 = 6;

/// A non-numeric batch key for a call's command (`r_12345`). Injective: every byte that is not
/// an ASCII letter or digit (the underscore included) is written `_xx` in hex, so call ids that
/// differ only in punctuation (`8000036-1`, `8000036.1`) never share a key.
pub fn key(prefix: &str, call_id: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1 + call_id.len());
    out.push_str(prefix);
    out.push('_');
    for b in call_id.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

pub use crate::bitrix24::api::telephony::attached;
pub use crate::bitrix24::api::Entity;

/// The commands one call needs now, which never split across batches.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPlan {
    pub call_id: String,
    pub commands: Vec<Command>,
}

/// The `attachRecord` of a call's recording (`None` without one).
pub fn attach_record(f: &CallFacts, call: &CallRef) -> Option<Command> {
    let link = f.link.as_ref()?;
    Some(api::telephony::attach_record_url(
        key("a", &f.id),
        call,
        link,
        &format!("{}.mp3", f.external_id),
    ))
}

/// The telephony chain a call still needs, given its ledger row: register → finish →
/// attachRecord for a new call; finish (→ attachRecord) once registered; only attachRecord
/// for a finished call whose recording is missing or changed. `user_id` is the Bitrix24 user
/// the call belongs to; `entity` the CRM entity it is registered with (`None`: Bitrix24's
/// choice).
pub fn telephony_chain(
    cfg: &Config,
    f: &CallFacts,
    l: &LedgerRow,
    user_id: i64,
    entity: Option<&Entity>,
    portal: Portal,
) -> Vec<Command> {
    // A link that arrives after finish; with attachRecord refused in batches it goes alone.
    let attach_later = |call: &CallRef| {
        portal
            .attach_in_batch
            .then(|| attach_record(f, call))
            .flatten()
    };
    let link_in_finish = record_url_in_finish(cfg, f, portal);
    let finish = |call: CallRef| {
        api::telephony::Finish {
            call,
            user_id,
            duration: f.seconds_talk,
            status_code: f.status_code,
            add_to_chat: cfg.sync.add_to_chat,
            record_url: f.link.as_deref().filter(|_| link_in_finish),
        }
        .command(key("f", &f.id))
    };
    // With the link in `finish`, the chain needs no attachRecord.
    let attach_now = |call: &CallRef| (!link_in_finish).then(|| attach_later(call)).flatten();
    let known = || CallRef::Known(l.b24_call_id.clone().unwrap_or_default());
    match l.stage {
        Stage::Pending => {
            let r = key("r", &f.id);
            let register = api::telephony::Register {
                user_id,
                phone: &f.client_number,
                incoming: f.way == Way::In,
                start: &rfc3339_in(f.started_at, cfg.bitrix24.timezone),
                external_id: &f.external_id,
                line_number: f.line_number.as_deref(),
                crm_create: cfg.rules.leads.create.allows(f.way),
                crm_entity: entity,
            }
            .command(r.clone());
            let call = CallRef::RegisteredBy(r);
            let mut out = vec![register, finish(call.clone())];
            out.extend(attach_now(&call));
            out
        }
        Stage::Registered => {
            let mut out = vec![finish(known())];
            out.extend(attach_now(&known()));
            out
        }
        Stage::Finished | Stage::Done if needs_recording(f, l) => {
            attach_later(&known()).into_iter().collect()
        }
        _ => Vec::new(),
    }
}

/// What the portal has shown it takes (portal facts, learnt as it answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Portal {
    /// `attachRecord` inside a batch (some portals refuse file methods there).
    pub attach_in_batch: bool,
    /// `finish`'s `RECORD_URL` downloaded into a file (unknown counts as yes until a recording
    /// check finds none of them).
    pub finish_takes_link: bool,
}

/// Whether `finish` carries the recording link itself (`sync.record_url_on_finish`, a portal
/// that downloads it, and the link known when the call is finished): two commands per call
/// instead of three.
pub fn record_url_in_finish(cfg: &Config, f: &CallFacts, portal: Portal) -> bool {
    cfg.sync.record_url_on_finish
        && portal.finish_takes_link
        && cfg.recordings.delivery == crate::config::Delivery::Link
        && f.link.is_some()
}

/// Whether a finished call's recording is missing or changed in Bitrix24 (the attached record in
/// telephony mode, the link in the activity's description in activity mode).
pub fn needs_recording(f: &CallFacts, l: &LedgerRow) -> bool {
    f.link.is_some()
        && l.record_url != f.link
        && (l.b24_call_id.is_some() || l.b24_activity_id.is_some())
}

/// Whether a finished call still needs its missed-call task.
pub fn needs_task(cfg: &Config, f: &CallFacts, l: &LedgerRow) -> bool {
    cfg.tasks.enabled
        && f.missed
        && l.task_id.is_none()
        && l.task_closed_by.is_none()
        && cfg.rules.skip_task(f).is_none()
}

/// When a missed call's task is due: at once, or (working hours with `after_hours = "wait"`)
/// at the next opening after the call.
pub fn task_due_at(cfg: &Config, f: &CallFacts) -> DateTime<Utc> {
    match cfg.rules.hours_for(f) {
        Some(h) if h.after_hours == crate::rules::AfterHours::Wait => {
            h.next_open(f.started_at).unwrap_or(f.started_at)
        }
        _ => f.started_at,
    }
}

/// A missed call's task deadline: `tasks.deadline_minutes` after the call, or after the next
/// opening when the call came outside working hours.
pub fn task_deadline(cfg: &Config, f: &CallFacts) -> DateTime<Utc> {
    let base = cfg
        .rules
        .hours_for(f)
        .and_then(|h| h.next_open(f.started_at))
        .unwrap_or(f.started_at);
    base + Duration::minutes(cfg.tasks.deadline_minutes as i64)
}

/// Human-readable description of a call, for activities and tasks.
pub fn describe(f: &CallFacts, tz: Tz, operator: Option<&str>) -> String {
    let local = f
        .started_at
        .with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S %Z");
    let mut lines = vec![
        format!(
            "{} call {} {}",
            if f.way == Way::In {
                "Incoming"
            } else {
                "Outgoing"
            },
            if f.way == Way::In { "from" } else { "to" },
            f.client_number
        ),
        format!("Time: {local}"),
        format!(
            "Result: {} (talk {} s, total {} s)",
            f.state.as_str(),
            f.seconds_talk,
            f.seconds_full
        ),
    ];
    if let Some(line) = &f.line_number {
        lines.push(format!("Line: {line}"));
    }
    if let Some(op) = operator {
        lines.push(format!("Operator: {op}"));
    }
    if let Some(link) = &f.link {
        lines.push(format!("Recording: {link}"));
    }
    lines.push(format!("Unitalk call {} ({})", f.id, f.external_id));
    lines.join("\n")
}

/// The `crm.activity.add` for a call (activity mode), bound to `entity`.
pub fn activity_add(
    cfg: &Config,
    f: &CallFacts,
    entity: &Entity,
    responsible: i64,
    operator: Option<&str>,
) -> Command {
    let tz = cfg.bitrix24.timezone;
    let subject = match f.way {
        Way::In if f.missed => format!("Missed call from {}", f.client_number),
        Way::In => format!("Incoming call from {}", f.client_number),
        Way::Out => format!("Outgoing call to {}", f.client_number),
    };
    let values = crate::rules::values(f, tz, operator, None);
    api::crm::CallActivity {
        owner: entity,
        phone: &f.client_number,
        subject,
        start: rfc3339_in(f.started_at, tz),
        end: rfc3339_in(f.started_at + Duration::seconds(f.seconds_full as i64), tz),
        incoming: f.way == Way::In,
        responsible,
        description: describe(f, tz, operator),
        origin_id: &f.external_id,
        extra: crate::rules::Fields::render(&cfg.rules.fields.activity, &values),
    }
    .command(key("v", &f.id))
}

/// A missed call's task description: `tasks.description` (or the call summary), always ending
/// with the call's `unitalk-<id>`, by which a task whose creation went unanswered is found.
pub fn task_description(
    cfg: &Config,
    f: &CallFacts,
    operator: Option<&str>,
    entity: Option<&Entity>,
) -> String {
    let tz = cfg.bitrix24.timezone;
    match &cfg.tasks.description {
        Some(t) => format!(
            "{}\n\n[{}]",
            t.render(&crate::rules::values(
                f,
                tz,
                operator,
                entity.and_then(|e| e.link(cfg))
            )),
            f.external_id
        ),
        None => describe(f, tz, operator),
    }
}

/// The description of a client's task once more missed calls are folded into it and, when the
/// client was reached, the call that did. Always rebuilt whole from the ledger: sending it twice
/// changes nothing (a lost answer is simply sent again).
pub fn folded_description(
    cfg: &Config,
    owner: &CallFacts,
    owner_entity: Option<&Entity>,
    again: &[CallFacts],
    reached_by: Option<&CallFacts>,
) -> String {
    let tz = cfg.bitrix24.timezone;
    let local = |f: &CallFacts| {
        f.started_at
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    };
    let mut text = task_description(cfg, owner, owner.operator_line.as_deref(), owner_entity);
    if !again.is_empty() {
        text.push_str("\n\nThe client called again:");
        for f in again {
            text.push_str(&format!(
                "\n- {} ({}, {})",
                local(f),
                f.state.as_str(),
                f.external_id
            ));
        }
    }
    if let Some(b) = reached_by {
        text.push_str(&format!(
            "\n\nClient reached: {} call at {} ({}).",
            if b.way == Way::In {
                "incoming"
            } else {
                "outgoing"
            },
            local(b),
            b.external_id
        ));
    }
    text
}

/// The `tasks.task.update` that rewrites a client task's description.
pub fn task_update_description(task_id: i64, call_key: String, description: String) -> Command {
    api::tasks::update_description(call_key, task_id, description)
}

/// The `tasks.task.complete` of a client task (completing a completed task changes nothing).
pub fn task_complete(task_id: i64, call_key: String) -> Command {
    api::tasks::complete(call_key, task_id)
}

/// The `tasks.task.add` for a missed call.
pub fn task_add(
    cfg: &Config,
    f: &CallFacts,
    responsible: i64,
    entity: Option<&Entity>,
    operator: Option<&str>,
) -> Command {
    let tz = cfg.bitrix24.timezone;
    let values = crate::rules::values(f, tz, operator, entity.and_then(|e| e.link(cfg)));
    api::tasks::NewTask {
        title: cfg.tasks.title.render(&values),
        description: task_description(cfg, f, operator, entity),
        responsible,
        deadline: rfc3339_in(task_deadline(cfg, f), tz),
        xml_id: f.external_id.clone(),
        crm_binding: entity.and_then(Entity::binding),
        extra: crate::rules::Fields::render(&cfg.rules.fields.task, &values),
    }
    .command(key("t", &f.id))
}

/// Packs whole plans into batches of at most [`MAX_COMMANDS`] commands, in order.
pub fn pack(plans: Vec<CallPlan>) -> Vec<Vec<CallPlan>> {
    let mut out: Vec<Vec<CallPlan>> = Vec::new();
    let mut size = 0;
    for p in plans.into_iter().filter(|p| !p.commands.is_empty()) {
        if out.is_empty() || size + p.commands.len() > MAX_COMMANDS {
            out.push(Vec::new());
            size = 0;
        }
        size += p.commands.len();
        out.last_mut().expect("just pushed").push(p);
    }
    out
}

/// The `crm.activity.update` that puts a changed recording link into an activity's description.
pub fn activity_update(
    cfg: &Config,
    f: &CallFacts,
    l: &LedgerRow,
    operator: Option<&str>,
) -> Option<Command> {
    let tz = cfg.bitrix24.timezone;
    Some(api::crm::activity_update(
        key("u", &f.id),
        l.b24_activity_id?,
        describe(f, tz, operator),
        rfc3339_in(f.started_at + Duration::seconds(f.seconds_full as i64), tz),
    ))
}

pub use super::ledger::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitrix24::wire::ErrorBody;
    use serde_json::json;

    #[test]
    fn batch_keys_are_injective() {
        let ids = [
            "8000036-1",
            "8000036.1",
            "8000036_1",
            "8000036_2d1",
            "80000361",
            "a b",
            "a_20b",
        ];
        let keys: std::collections::HashSet<String> = ids.iter().map(|i| key("r", i)).collect();
        assert_eq!(keys.len(), ids.len(), "{keys:?}");
        assert_eq!(key("r", "12345"), "r_12345");
        assert!(keys
            .iter()
            .all(|k| k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')));
    }

    fn plan(n: usize, each: usize) -> CallPlan {
        CallPlan {
            call_id: n.to_string(),
            commands: (0..each)
                .map(|i| Command::new(format!("c{n}_{i}"), "user.current", json!({})))
                .collect(),
        }
    }

    #[test]
    fn whole_chains_are_packed_and_never_split() {
        let batches = pack((0..40).map(|n| plan(n, 3)).collect());
        assert!(batches
            .iter()
            .all(|b| b.iter().map(|p| p.commands.len()).sum::<usize>() <= 50));
        assert_eq!(batches[0].len(), 16, "16 chains of 3 fit in 50");
        assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 40);
    }

    #[test]
    fn keys_are_never_numeric() {
        assert_eq!(key("r", "12345"), "r_12345");
        assert_eq!(key("r", "a-b.c"), "r_a_2db_2ec");
    }

    #[test]
    fn errors_are_classified_as_the_reference_says() {
        let table = [
            ("ERROR_CORE", "Unsupported phone number format", "permanent"),
            (
                "ERROR_CORE",
                "User is not found or is not active",
                "permanent",
            ),
            ("QUERY_LIMIT_EXCEEDED", "", "deferred"),
            ("OPERATION_TIME_LIMIT", "", "deferred"),
            ("ERROR_BATCH_METHOD_NOT_ALLOWED", "", "deferred"),
            ("ERROR_CORE", "Unexpected database error", "retry"),
            ("", "Something new", "retry"),
            ("insufficient_scope", "", "fatal"),
            ("WRONG_AUTH_TYPE", "", "fatal"),
        ];
        for (code, description, want) in table {
            let got = match classify_error(
                "m",
                &ErrorBody {
                    code: code.into(),
                    description: description.into(),
                },
            ) {
                Failure::Permanent(_) => "permanent",
                Failure::Deferred(_) => "deferred",
                Failure::Retry(_) => "retry",
                Failure::Fatal(_) => "fatal",
            };
            assert_eq!(got, want, "{code} {description}");
        }
    }

    #[test]
    fn deferred_failures_count_no_attempt() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let (row, reason) = fail(
            LedgerRow::pending("1"),
            Failure::Deferred("429".into()),
            now,
        );
        assert_eq!(
            (row.attempts, row.stage, row.next_attempt_at, reason),
            (0, Stage::Pending, None, None)
        );
    }

    #[test]
    fn repeated_retryable_failures_end_in_quarantine() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-22T12:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let mut l = LedgerRow::pending("1");
        for i in 1..MAX_ATTEMPTS {
            let (row, reason) = fail(l, Failure::Retry("boom".into()), now);
            assert!(reason.is_none(), "attempt {i}");
            assert!(row.next_attempt_at.unwrap() > now);
            l = row;
        }
        let (row, reason) = fail(l, Failure::Retry("boom".into()), now);
        assert_eq!(row.stage, Stage::Quarantined);
        assert!(reason.unwrap().contains("after 6 attempts"));
    }
}
