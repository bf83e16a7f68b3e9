//! From calls and ledger rows to Bitrix24 commands, and from command outcomes back to ledger rows.
//!
//! Pure functions: given a call's facts, its ledger row and what lookups found, [`main_chain`]
//! says which commands the call still needs (never a second `register` once one is
//! acknowledged), [`pack`] puts whole chains into batches of at most 50 commands, and
//! [`record_chain`] / [`record_task`] turn a batch outcome into the call's next ledger row,
//! classifying each failure as retryable or permanent.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};

use super::call::{CallFacts, Way};
use crate::bitrix24::batch::{result_ref, Command, MAX_COMMANDS};
use crate::bitrix24::wire::as_i64;
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

/// A CRM entity as Bitrix24 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entity {
    /// `CONTACT`, `LEAD` or `COMPANY`.
    pub kind: String,
    pub id: i64,
}

impl Entity {
    /// The entity's card in the portal (`{origin}/crm/contact/details/797/`).
    pub fn link(&self, cfg: &Config) -> Option<String> {
        let kind = match self.kind.as_str() {
            "CONTACT" => "contact",
            "COMPANY" => "company",
            "LEAD" => "lead",
            _ => return None,
        };
        Some(format!(
            "{}/crm/{kind}/details/{}/",
            cfg.bitrix24.portal_origin()?,
            self.id
        ))
    }

    /// `UF_CRM_TASK` binding: `C_5`, `L_5`, `CO_5`.
    pub fn binding(&self) -> Option<String> {
        let prefix = match self.kind.as_str() {
            "CONTACT" => "C",
            "LEAD" => "L",
            "COMPANY" => "CO",
            _ => return None,
        };
        Some(format!("{prefix}_{}", self.id))
    }

    /// `OWNER_TYPE_ID` of `crm.activity.add`.
    pub fn owner_type_id(&self) -> Option<i64> {
        match self.kind.as_str() {
            "LEAD" => Some(1),
            "CONTACT" => Some(3),
            "COMPANY" => Some(4),
            _ => None,
        }
    }
}

/// The commands one call needs now, which never split across batches.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPlan {
    pub call_id: String,
    pub commands: Vec<Command>,
}

/// The `attachRecord` of a call's recording (`None` without one).
pub fn attach_record(cfg: &Config, f: &CallFacts, call_id_param: Value) -> Option<Command> {
    let link = f.link.as_ref()?;
    let _ = cfg;
    Some(Command::new(
        key("a", &f.id),
        "telephony.externalCall.attachRecord",
        json!({"CALL_ID": call_id_param, "RECORD_URL": link, "FILENAME": format!("{}.mp3", f.external_id)}),
    ))
}

/// The telephony chain a call still needs, given its ledger row: register → finish →
/// attachRecord for a new call; finish (→ attachRecord) once registered; only attachRecord
/// for a finished call whose recording is missing or changed. `user_id` is the Bitrix24 user
/// the call belongs to.
pub fn telephony_chain(
    cfg: &Config,
    f: &CallFacts,
    l: &LedgerRow,
    user_id: i64,
    attach_in_batch: bool,
) -> Vec<Command> {
    let attach_record_later = |cfg: &Config, f: &CallFacts, id: Value| {
        if attach_in_batch {
            attach_record(cfg, f, id)
        } else {
            None
        }
    };
    let attach_record = attach_record_later;
    let tz = cfg.bitrix24.timezone;
    let link_in_finish = record_url_in_finish(cfg, f);
    let finish = |call_id: Value| {
        let mut p = json!({
            "CALL_ID": call_id, "USER_ID": user_id, "DURATION": f.seconds_talk,
            "STATUS_CODE": f.status_code, "ADD_TO_CHAT": if cfg.sync.add_to_chat { 1 } else { 0 },
        });
        if link_in_finish {
            p["RECORD_URL"] = json!(f.link);
        }
        Command::new(key("f", &f.id), "telephony.externalCall.finish", p)
    };
    // With the link in `finish`, the chain needs no attachRecord.
    let attach_record = |cfg: &Config, f: &CallFacts, id: Value| {
        if link_in_finish {
            None
        } else {
            attach_record(cfg, f, id)
        }
    };
    match l.stage {
        Stage::Pending => {
            let mut register = json!({
                "USER_ID": user_id, "PHONE_NUMBER": f.client_number,
                "TYPE": if f.way == Way::In { 2 } else { 1 },
                "CALL_START_DATE": rfc3339_in(f.started_at, tz),
                "EXTERNAL_CALL_ID": f.external_id, "SHOW": 0,
                "CRM_CREATE": if cfg.rules.leads.create.allows(f.way) { 1 } else { 0 },
            });
            if let Some(line) = &f.line_number {
                register["LINE_NUMBER"] = json!(line);
            }
            let r = key("r", &f.id);
            let call_ref = json!(result_ref(&r, "CALL_ID"));
            let mut out = vec![
                Command::new(r, "telephony.externalCall.register", register),
                finish(call_ref.clone()),
            ];
            out.extend(attach_record(cfg, f, call_ref));
            out
        }
        Stage::Registered => {
            let id = json!(l.b24_call_id.clone().unwrap_or_default());
            let mut out = vec![finish(id.clone())];
            out.extend(attach_record(cfg, f, id));
            out
        }
        Stage::Finished | Stage::Done if needs_recording(f, l) => {
            attach_record_later(cfg, f, json!(l.b24_call_id.clone().unwrap_or_default()))
                .into_iter()
                .collect()
        }
        _ => Vec::new(),
    }
}

/// Whether an `attachRecord` answer proves the recording is attached: only a `FILE_ID` does; an
/// `uploadUrl` answer means the file is still to be uploaded.
pub fn attached(result: &Value) -> Result<(), String> {
    if result.get("FILE_ID").and_then(as_i64).is_some() {
        return Ok(());
    }
    if result.get("uploadUrl").is_some() {
        return Err("telephony.externalCall.attachRecord answered an uploadUrl, not a FILE_ID: the recording is not attached yet".into());
    }
    Err(format!(
        "telephony.externalCall.attachRecord answered without a FILE_ID: {}",
        crate::redact::field(&result.to_string())
    ))
}

/// Whether `finish` carries the recording link itself (`sync.record_url_on_finish`, and the link
/// is known when the call is finished): two commands per call instead of three.
pub fn record_url_in_finish(cfg: &Config, f: &CallFacts) -> bool {
    cfg.sync.record_url_on_finish
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
    let mut params = json!({"fields": {
        "OWNER_TYPE_ID": entity.owner_type_id(), "OWNER_ID": entity.id, "TYPE_ID": 2,
        "COMMUNICATIONS": [{"VALUE": f.client_number, "ENTITY_ID": entity.id, "ENTITY_TYPE_ID": entity.owner_type_id(), "TYPE": "PHONE"}],
        "SUBJECT": subject,
        "START_TIME": rfc3339_in(f.started_at, tz),
        "END_TIME": rfc3339_in(f.started_at + Duration::seconds(f.seconds_full as i64), tz),
        "COMPLETED": "Y", "DIRECTION": if f.way == Way::In { 1 } else { 2 }, "PRIORITY": 2,
        "RESPONSIBLE_ID": responsible,
        "DESCRIPTION": describe(f, tz, operator), "DESCRIPTION_TYPE": 1,
        "ORIGINATOR_ID": "ubsync", "ORIGIN_ID": f.external_id,
    }});
    let values = crate::rules::values(f, tz, operator, None);
    if let Some(m) = params["fields"].as_object_mut() {
        m.extend(crate::rules::Fields::render(
            &cfg.rules.fields.activity,
            &values,
        ));
    }
    Command::new(key("v", &f.id), "crm.activity.add", params)
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
    Command::new(
        call_key,
        "tasks.task.update",
        json!({"taskId": task_id, "fields": {"DESCRIPTION": description}}),
    )
}

/// The `tasks.task.complete` of a client task (completing a completed task changes nothing).
pub fn task_complete(task_id: i64, call_key: String) -> Command {
    Command::new(call_key, "tasks.task.complete", json!({"taskId": task_id}))
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
    let mut fields = json!({
        "TITLE": cfg.tasks.title.render(&values),
        "DESCRIPTION": task_description(cfg, f, operator, entity),
        "RESPONSIBLE_ID": responsible,
        "DEADLINE": rfc3339_in(task_deadline(cfg, f), tz),
        "XML_ID": f.external_id,
    });
    if let Some(b) = entity.and_then(Entity::binding) {
        fields["UF_CRM_TASK"] = json!([b]);
    }
    if let Value::Object(m) = &mut fields {
        m.extend(crate::rules::Fields::render(
            &cfg.rules.fields.task,
            &values,
        ));
    }
    Command::new(
        key("t", &f.id),
        "tasks.task.add",
        json!({ "fields": fields }),
    )
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
    let id = l.b24_activity_id?;
    Some(Command::new(
        key("u", &f.id),
        "crm.activity.update",
        json!({"id": id, "fields": {
            "DESCRIPTION": describe(f, cfg.bitrix24.timezone, operator), "DESCRIPTION_TYPE": 1,
            "END_TIME": rfc3339_in(f.started_at + Duration::seconds(f.seconds_full as i64), cfg.bitrix24.timezone),
        }}),
    ))
}

pub use super::ledger::*;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitrix24::wire::ErrorBody;

    #[test]
    fn attach_record_counts_only_with_a_file_id() {
        assert!(attached(&json!({"FILE_ID": 9079})).is_ok());
        assert!(attached(&json!({"FILE_ID": "9079"})).is_ok());
        let e =
            attached(&json!({"uploadUrl": "https://p/upload", "fieldName": "file"})).unwrap_err();
        assert!(e.contains("not attached yet"), "{e}");
        assert!(attached(&json!(true)).is_err());
        assert!(attached(&json!({})).is_err());
    }

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
