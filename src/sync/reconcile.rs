//! Reconciliation: proves, for a stretch of time, that Bitrix24 holds every call Unitalk knows
//! about exactly once, and repairs what is missing.
//!
//! [`reconcile`] re-pulls the range from Unitalk, lists what Bitrix24 holds for it
//! (`voximplant.statistic.get` by `CALL_START_DATE`, or `crm.activity.list` by `ORIGINATOR_ID` in
//! activity mode; 50 rows a page, many pages a batch), checks the missed-call tasks the ledger
//! names (`tasks.task.get`), and compares all three with the ledger ([`compare`], pure). Unless it
//! is a dry run, calls missing from Bitrix24 go back to `pending` and missing tasks are cleared,
//! and the ordinary push path sends them. It never deletes anything in the portal: duplicates are
//! reported for a human.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::Value;

use super::call::{classify, content_hash, Disposition};
use super::{lookup, pull_window, push_due, window, PassOptions, PassSummary, SyncCtx, SyncError};
use crate::bitrix24::api::{self, telephony::CallRecord};
use crate::bitrix24::batch::Command;
use crate::config::Mode;
use crate::store::ledger::{LedgerRow, Observation, Stage};
use crate::timezone::rfc3339_in;

/// What a reconciliation found (and did).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReconcileReport {
    pub from: String,
    pub to: String,
    pub dry_run: bool,
    /// Calls Unitalk lists for the range that ubsync pushes (internal calls excluded).
    pub in_unitalk: Vec<String>,
    /// Calls the ledger says are in Bitrix24.
    pub in_ledger: Vec<String>,
    /// Calls Bitrix24 holds (by `EXTERNAL_CALL_ID` / `ORIGIN_ID`).
    pub in_bitrix24: Vec<String>,
    /// In Unitalk, not in Bitrix24.
    pub missing_from_bitrix24: Vec<String>,
    /// One call held more than once: (call id, copies). Reported, never deleted.
    pub duplicated_in_bitrix24: Vec<(String, usize)>,
    /// The ledger says pushed, Bitrix24 lacks it.
    pub ledger_only: Vec<String>,
    /// Missed incoming calls whose task is missing.
    pub tasks_missing: Vec<String>,
    /// Missing calls that cannot be repaired automatically (quarantined or skipped): why.
    pub not_repairable: Vec<(String, String)>,
    /// Calls whose state in Bitrix24 could not be established (the listing or a task lookup
    /// failed or was incomplete). Never repaired: a repair on partial knowledge duplicates.
    pub unknown: Vec<String>,
    /// Whether Bitrix24's listing of the range was read completely.
    pub listing_complete: bool,
    /// What was repaired (empty on a dry run).
    pub repaired_calls: Vec<String>,
    pub repaired_tasks: Vec<String>,
    /// Differences a repair was attempted for that are still there after the repair pass:
    /// (call id, why). Never counted as repaired.
    pub not_repaired: Vec<(String, String)>,
}

impl ReconcileReport {
    /// Whether Bitrix24 matched Unitalk before any repair.
    pub fn consistent(&self) -> bool {
        self.missing_from_bitrix24.is_empty()
            && self.duplicated_in_bitrix24.is_empty()
            && self.ledger_only.is_empty()
            && self.tasks_missing.is_empty()
            && self.unknown.is_empty()
    }

    /// Whether the range is proven exact after this run: consistent before, or everything found
    /// repaired (no unknowns, no duplicates, nothing unrepairable, not a dry run).
    pub fn proven(&self) -> bool {
        self.consistent()
            || (!self.dry_run
                && self.unknown.is_empty()
                && self.duplicated_in_bitrix24.is_empty()
                && self.not_repairable.is_empty()
                && self.not_repaired.is_empty())
    }

    /// The readable table `ubsync reconcile` prints.
    pub fn table(&self) -> String {
        let mut table = crate::table::plain();
        let mut row = |name: &str, ids: &[String]| {
            let sample: Vec<&str> = ids.iter().take(8).map(String::as_str).collect();
            let more = if ids.len() > 8 {
                format!(" … +{}", ids.len() - 8)
            } else {
                String::new()
            };
            table.add_row(vec![
                comfy_table::Cell::new(format!(" {name}")),
                comfy_table::Cell::new(ids.len()).set_alignment(comfy_table::CellAlignment::Right),
                comfy_table::Cell::new(format!("{}{more}", sample.join(" "))),
            ]);
        };
        let dups: Vec<String> = self
            .duplicated_in_bitrix24
            .iter()
            .map(|(id, n)| format!("{id}×{n}"))
            .collect();
        let stuck: Vec<String> = self
            .not_repairable
            .iter()
            .map(|(id, why)| format!("{id} ({why})"))
            .collect();
        row("in Unitalk", &self.in_unitalk);
        row("in the ledger", &self.in_ledger);
        row("in Bitrix24", &self.in_bitrix24);
        row("missing from Bitrix24", &self.missing_from_bitrix24);
        row("duplicated in Bitrix24", &dups);
        row("ledger only (lost in B24)", &self.ledger_only);
        row("missed-call tasks missing", &self.tasks_missing);
        row(
            "unknown (Bitrix24 did not answer completely)",
            &self.unknown,
        );
        row("not repairable", &stuck);
        if !self.dry_run {
            row("repaired calls", &self.repaired_calls);
            row("repaired tasks", &self.repaired_tasks);
            let failed: Vec<String> = self
                .not_repaired
                .iter()
                .map(|(id, why)| format!("{id} ({why})"))
                .collect();
            row("not repaired", &failed);
        }
        let table = crate::table::render(&table);
        format!(
            "reconcile {} .. {}{}\n{table}\n",
            self.from,
            self.to,
            if self.dry_run {
                " (dry run: nothing repaired)"
            } else {
                ""
            }
        )
    }
}

/// The facts [`compare`] works on, for one call.
#[derive(Debug, Clone)]
pub struct CallView {
    pub id: String,
    /// Missed, and a task is wanted for it (the task rules do not exclude it).
    pub missed: bool,
    pub ledger: Option<LedgerRow>,
}

/// Compares Unitalk, the ledger and Bitrix24 for a range. `held` counts Bitrix24 records per call
/// id; `tasks_found` are the task ids Bitrix24 confirmed. Pure.
pub fn compare(
    calls: &[CallView],
    held: &BTreeMap<String, usize>,
    tasks_found: &HashSet<i64>,
    tasks_enabled: bool,
) -> ReconcileReport {
    let mut r = ReconcileReport::default();
    // A call whose activity was left out on purpose is in Bitrix24 only as its task.
    let pushed =
        |l: &LedgerRow| matches!(l.stage, Stage::Finished | Stage::Done) && !l.activity_left_out();
    for c in calls {
        r.in_unitalk.push(c.id.clone());
        let in_b24 = held.get(&c.id).copied().unwrap_or(0) > 0;
        let in_ledger = c.ledger.as_ref().is_some_and(pushed);
        if in_ledger {
            r.in_ledger.push(c.id.clone());
        }
        if !in_b24 {
            r.missing_from_bitrix24.push(c.id.clone());
            if in_ledger {
                r.ledger_only.push(c.id.clone());
            }
            if let Some(l) = c.ledger.as_ref().filter(|l| {
                matches!(l.stage, Stage::Quarantined | Stage::Skipped) || l.activity_left_out()
            }) {
                r.not_repairable.push((
                    c.id.clone(),
                    l.reason.clone().unwrap_or_else(|| l.stage.as_str().into()),
                ));
            }
        }
        // A call whose client was reached before its task was made needs none (by design).
        let no_task_due = c
            .ledger
            .as_ref()
            .is_some_and(|l| l.task_id.is_none() && l.task_closed_by.is_some());
        if tasks_enabled && c.missed && in_b24 && !no_task_due {
            let task_ok = c
                .ledger
                .as_ref()
                .and_then(|l| l.task_id)
                .is_some_and(|t| tasks_found.contains(&t));
            if !task_ok {
                r.tasks_missing.push(c.id.clone());
            }
        }
    }
    // Numeric ids read best in numeric order: shorter first, then by text.
    let order = |v: &mut Vec<String>| v.sort_by(|a, b| (a.len(), a).cmp(&(b.len(), b)));
    for v in [
        &mut r.in_unitalk,
        &mut r.in_ledger,
        &mut r.missing_from_bitrix24,
        &mut r.ledger_only,
        &mut r.tasks_missing,
    ] {
        order(v);
    }
    r.not_repairable
        .sort_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
    let known: BTreeSet<&String> = calls.iter().map(|c| &c.id).collect();
    for (id, n) in held {
        if *n > 0 {
            r.in_bitrix24.push(id.clone());
        }
        if *n > 1 && known.contains(id) {
            r.duplicated_in_bitrix24.push((id.clone(), *n));
        }
    }
    order(&mut r.in_bitrix24);
    r.duplicated_in_bitrix24
        .sort_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
    r
}

/// Everything Bitrix24 holds for `[from, to)`: call id → number of records, and whether the
/// listing was read completely (every page answered, the total reached, the last page short).
pub(super) async fn held_in_bitrix24(
    ctx: &SyncCtx,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(BTreeMap<String, usize>, bool), SyncError> {
    let (rows, complete) = listed_in_bitrix24(ctx, from, to).await?;
    let mut held = BTreeMap::new();
    for id in rows.keys() {
        *held.entry(id.clone()).or_insert(0) += rows[id].len();
    }
    Ok((held, complete))
}

/// One record Bitrix24 listed for a call: a statistics row in telephony mode, an activity
/// (only its `activity_id`) in activity mode.
pub(super) type Listed = CallRecord;

/// Pages (of 50 rows) a listing request asks for after the first: a full batch, so a listing
/// costs the rate limit as few requests as it can.
const LISTING_PAGES_PER_REQUEST: u64 = 50;

/// Bitrix24's records for `[from, to)` (statistics rows in telephony mode, activities in
/// activity mode) by Unitalk call id, and whether the listing was read completely.
pub(super) async fn listed_in_bitrix24(
    ctx: &SyncCtx,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(BTreeMap<String, Vec<Listed>>, bool), SyncError> {
    let tz = ctx.cfg.bitrix24.timezone;
    let (from, to) = (rfc3339_in(from, tz), rfc3339_in(to, tz));
    let mode = ctx.cfg.bitrix24.mode;
    let method = match mode {
        Mode::Telephony => "voximplant.statistic.get",
        Mode::Activity => "crm.activity.list",
    };
    let page = |start: u64| match mode {
        Mode::Telephony => api::telephony::statistics_by_start(&from, &to, start),
        Mode::Activity => api::crm::activities_by_start(&from, &to, start),
    };
    // Every request is a batch, the first page too.
    let first = match lookup(ctx, vec![Command::new("page0", method, page(0))]).await {
        Ok(f) => f,
        Err(SyncError::Bitrix24(e)) if e.is_retryable() => {
            tracing::warn!(error = %e, "Bitrix24's listing of the range failed; the range is unknown");
            return Ok((BTreeMap::new(), false));
        }
        Err(e) => return Err(e),
    };
    let page0 = first.results.get("page0");
    let mut rows: Vec<Value> = page0.and_then(Value::as_array).cloned().unwrap_or_default();
    let mut complete = page0.is_some_and(Value::is_array);
    // Page by the total, then keep going while pages come back full (a total may lie).
    let mut start = rows.len() as u64;
    let mut last_full = rows.len() >= 50;
    let total = first.totals.get("page0").copied().unwrap_or(0);
    while complete && (start < total || last_full) {
        let commands: Vec<Command> = (0..LISTING_PAGES_PER_REQUEST)
            .map(|i| {
                Command::new(
                    format!("page{}", start / 50 + i),
                    method,
                    page(start + i * 50),
                )
            })
            .collect();
        let out = match lookup(ctx, commands.clone()).await {
            Ok(o) => o,
            Err(SyncError::Bitrix24(e)) if e.is_retryable() => {
                tracing::warn!(error = %e, "Bitrix24's listing of the range failed; the range is unknown");
                complete = false;
                break;
            }
            Err(e) => return Err(e),
        };
        let mut got_any = false;
        for c in &commands {
            match out.results.get(&c.key).and_then(Value::as_array) {
                Some(page_rows) => {
                    last_full = page_rows.len() >= 50;
                    got_any |= !page_rows.is_empty();
                    rows.extend(page_rows.iter().cloned());
                    if !last_full {
                        break;
                    }
                }
                None => {
                    complete = false;
                    break;
                }
            }
        }
        if !got_any || !last_full {
            last_full = false;
        }
        start += LISTING_PAGES_PER_REQUEST * 50;
        if !got_any && start >= total {
            break;
        }
    }
    if complete && (rows.len() as u64) < total {
        tracing::warn!(
            total,
            read = rows.len(),
            "Bitrix24's listing ended before its total"
        );
        complete = false;
    }
    let mut held: BTreeMap<String, Vec<Listed>> = BTreeMap::new();
    for r in rows {
        let (key, rec) = match mode {
            Mode::Telephony => {
                let rec = CallRecord::decode(&r);
                (rec.external_call_id.clone(), rec)
            }
            Mode::Activity => (
                api::crm::origin_id(&r),
                CallRecord {
                    activity_id: api::crm::activity_id(&r),
                    ..Default::default()
                },
            ),
        };
        if let Some(id) = key.and_then(|e| e.strip_prefix("unitalk-").map(str::to_string)) {
            held.entry(id).or_default().push(rec);
        }
    }
    Ok((held, complete))
}

/// Reconciles `[from, to)`; repairs unless `dry_run`.
pub async fn reconcile(
    ctx: &SyncCtx,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    dry_run: bool,
) -> Result<(ReconcileReport, PassSummary), SyncError> {
    let cfg = &ctx.cfg;
    let now = ctx.clock.now();
    let known = super::known_lines(ctx)?;

    // Unitalk's view.
    let mut records = Vec::new();
    for w in window::plan_windows(
        from,
        Duration::zero(),
        Duration::zero(),
        super::secs(cfg.sync.max_window),
        to,
    ) {
        records.extend(pull_window(ctx, w).await?);
    }
    let mut seen = HashSet::new();
    let mut pushable = Vec::new();
    for raw in records {
        let Ok(call) = super::parse(ctx, &raw) else {
            continue;
        };
        if call.started_at < from || call.started_at >= to || !seen.insert(call.id.clone()) {
            continue;
        }
        if let Disposition::Push(f) = classify(&call, &known, &cfg.sync, &cfg.rules) {
            // Whether a task is wanted for it: missed, and not excluded by the task rules.
            let wants_task = f.missed && cfg.rules.skip_task(&f).is_none();
            pushable.push((call, raw, wants_task));
        }
    }

    // Bitrix24's view.
    let (held, listing_complete) = held_in_bitrix24(ctx, from, to).await?;
    let ledger: HashMap<String, LedgerRow> = {
        let store = ctx.store.lock();
        let mut m = HashMap::new();
        for (c, _, _) in &pushable {
            if let Some(l) = store.ledger_row(&c.id)? {
                m.insert(c.id.clone(), l);
            }
        }
        m
    };
    let task_ids: Vec<i64> = pushable
        .iter()
        .filter(|(_, _, missed)| *missed)
        .filter_map(|(c, _, _)| ledger.get(&c.id).and_then(|l| l.task_id))
        .collect();
    let commands: Vec<Command> = task_ids
        .iter()
        .map(|t| api::tasks::get(format!("t{t}"), *t))
        .collect();
    let found = match lookup(ctx, commands).await {
        Ok(f) => f,
        Err(SyncError::Bitrix24(e)) if e.is_retryable() => {
            tracing::warn!(error = %e, "task lookups failed; their tasks are unknown");
            Default::default()
        }
        Err(e) => return Err(e),
    };
    // A task is missing only when Bitrix24 says so ("not found"); no answer is "unknown".
    let tasks_unknown: HashSet<i64> = task_ids
        .iter()
        .copied()
        .filter(|t| {
            let k = format!("t{t}");
            !found.results.contains_key(&k)
                && !found.errors.get(&k).is_some_and(|e| {
                    let d = e.description.to_lowercase();
                    d.contains("not found") || e.effective_code().contains("NOT_FOUND")
                })
        })
        .collect();
    let tasks_found: HashSet<i64> = task_ids
        .iter()
        .copied()
        .filter(|t| {
            found
                .results
                .get(&format!("t{t}"))
                .and_then(api::tasks::task_id)
                .is_some()
        })
        .collect();
    let views: Vec<CallView> = pushable
        .iter()
        .map(|(c, _, missed)| CallView {
            id: c.id.clone(),
            missed: *missed,
            ledger: ledger.get(&c.id).cloned(),
        })
        .collect();
    let mut report = compare(&views, &held, &tasks_found, cfg.tasks.enabled);
    report.listing_complete = listing_complete;
    if !listing_complete {
        // What the listing did not show is unknown, not missing.
        report.unknown = std::mem::take(&mut report.missing_from_bitrix24);
        report.ledger_only.clear();
        report.not_repairable.clear();
    }
    let unknown_tasks: Vec<String> = views
        .iter()
        .filter(|v| {
            v.ledger
                .as_ref()
                .and_then(|l| l.task_id)
                .is_some_and(|t| tasks_unknown.contains(&t))
        })
        .map(|v| v.id.clone())
        .collect();
    report
        .tasks_missing
        .retain(|id| !unknown_tasks.contains(id));
    for id in unknown_tasks {
        if !report.unknown.contains(&id) {
            report.unknown.push(id);
        }
    }
    // In the account's zone, with its offset, as every message gives times.
    report.from = rfc3339_in(from, cfg.unitalk.timezone);
    report.to = rfc3339_in(to, cfg.unitalk.timezone);
    report.dry_run = dry_run;
    let mut summary = PassSummary::default();
    if dry_run {
        return Ok((report, summary));
    }

    // Repair: back to pending what Bitrix24 lacks, clear missing tasks, then push as usual.
    let unrepairable: HashSet<&String> = report.not_repairable.iter().map(|(id, _)| id).collect();
    let mut rows = Vec::new();
    let mut observations = Vec::new();
    for (call, raw, _) in &pushable {
        let id = &call.id;
        if report.missing_from_bitrix24.contains(id) && !unrepairable.contains(id) {
            match ledger.get(id) {
                None => observations.push(Observation {
                    call_id: id.clone(),
                    started_at: call.started_at,
                    raw: raw.to_string(),
                    content_hash: content_hash(call),
                }),
                Some(l)
                    if matches!(
                        l.stage,
                        Stage::Pending | Stage::InFlight | Stage::Registered
                    ) => {}
                Some(l) => {
                    let mut fresh = LedgerRow::pending(id);
                    fresh.task_id = l.task_id;
                    rows.push(fresh);
                }
            }
            report.repaired_calls.push(id.clone());
        } else if report.tasks_missing.contains(id) {
            if let Some(l) = ledger.get(id) {
                let mut l = l.clone();
                l.task_id = None;
                l.task_in_flight_since = None;
                if l.stage == Stage::Done {
                    l.stage = Stage::Finished;
                }
                rows.push(l);
                report.repaired_tasks.push(id.clone());
            }
        }
    }
    {
        let mut store = ctx.store.lock();
        store.observe(&observations, now)?;
        store.apply(&rows, &[], None, now)?;
    }
    push_due(ctx, &PassOptions::default(), &mut summary).await?;
    // What was meant to be repaired counts only when the ledger shows it done.
    settle_repairs(ctx, &mut report)?;
    Ok((report, summary))
}

/// Keeps in `repaired_calls`/`repaired_tasks` only what the repair pass did: a call now in
/// Bitrix24 (finished), a task now made. The rest moves to `not_repaired`, with why.
fn settle_repairs(ctx: &SyncCtx, report: &mut ReconcileReport) -> Result<(), SyncError> {
    let store = ctx.store.lock();
    let why = |l: Option<&LedgerRow>| match l {
        None => "not in the state".to_string(),
        Some(l) => l
            .reason
            .clone()
            .or_else(|| l.last_error.clone())
            .unwrap_or_else(|| format!("still {} after the repair pass", l.stage.as_str())),
    };
    let mut calls = Vec::new();
    for id in std::mem::take(&mut report.repaired_calls) {
        let l = store.ledger_row(&id)?;
        let done = l.as_ref().is_some_and(|l| {
            matches!(l.stage, Stage::Finished | Stage::Done)
                && (l.b24_call_id.is_some() || l.b24_activity_id.is_some())
        });
        if done {
            calls.push(id);
        } else {
            report.not_repaired.push((id, why(l.as_ref())));
        }
    }
    let mut tasks = Vec::new();
    for id in std::mem::take(&mut report.repaired_tasks) {
        let l = store.ledger_row(&id)?;
        if l.as_ref().is_some_and(|l| l.task_id.is_some()) {
            tasks.push(id);
        } else {
            let reason = match l.as_ref() {
                Some(l) if l.task_closed_by.is_some() => {
                    "no task is due: the client was reached after the call".to_string()
                }
                other => why(other),
            };
            report.not_repaired.push((id, reason));
        }
    }
    report.repaired_calls = calls;
    report.repaired_tasks = tasks;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: &str, missed: bool, stage: Option<Stage>, task: Option<i64>) -> CallView {
        CallView {
            id: id.into(),
            missed,
            ledger: stage.map(|s| {
                let mut l = LedgerRow::pending(id);
                l.stage = s;
                l.task_id = task;
                l
            }),
        }
    }

    #[test]
    fn every_category_is_found() {
        let calls = vec![
            view("1", false, Some(Stage::Done), None),        // fine
            view("2", false, None, None),                     // missing, never seen
            view("3", false, Some(Stage::Done), None),        // ledger only
            view("4", false, Some(Stage::Done), None),        // duplicated
            view("5", true, Some(Stage::Done), Some(77)),     // task gone
            view("6", true, Some(Stage::Done), Some(78)),     // task fine
            view("7", false, Some(Stage::Quarantined), None), // missing, not repairable
        ];
        let held = BTreeMap::from([
            ("1".to_string(), 1),
            ("4".to_string(), 2),
            ("5".to_string(), 1),
            ("6".to_string(), 1),
            ("99".to_string(), 1),
        ]);
        let r = compare(&calls, &held, &HashSet::from([78]), true);
        assert_eq!(r.missing_from_bitrix24, vec!["2", "3", "7"]);
        assert_eq!(r.ledger_only, vec!["3"]);
        assert_eq!(r.duplicated_in_bitrix24, vec![("4".to_string(), 2)]);
        assert_eq!(r.tasks_missing, vec!["5"]);
        assert_eq!(r.not_repairable.len(), 1);
        assert!(
            r.in_bitrix24.contains(&"99".to_string()),
            "records from outside the pull are listed"
        );
        assert!(!r.consistent());
    }
}
