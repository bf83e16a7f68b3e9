//! The sync pass: the one worker every command drives (`sync`, `demo`, and later the daemon,
//! `backfill` and `reconcile`).
//!
//! [`run_pass`] refreshes operators and inner-line statuses, then for each window of
//! `[cursor − lookback, now − settle)`: pulls Unitalk history (fixed `dateTo`, deduped by id,
//! re-paged if the total moved), stores the observations (the later fetch wins), pushes every
//! call with work due — whatever window it came from — and only then advances the cursor.
//! Pushing works from the ledger: calls whose outcome is unknown are probed first, then the
//! remaining chains go out in batches, each call marked in flight before its batch is sent and
//! every command's outcome recorded in one transaction afterwards. Decisions live in the pure
//! modules [`call`], [`window`] and [`plan`]; this module only moves data between them and the
//! upstreams.

pub mod call;
mod followup;
pub mod plan;
mod pull;
pub mod reconcile;
pub mod window;

pub use followup::SWEEP_STREAM;
pub use pull::refresh_lines;
use pull::{observe, pull_window};

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use self::call::{classify, CallFacts, Disposition};
use self::plan::{key, CallPlan, Entity};
use crate::bitrix24::batch::Command;
use crate::bitrix24::wire::{as_i64, as_text, BatchOutcome};
use crate::bitrix24::{Bitrix24Client, Bitrix24Error};
use crate::clock::Clock;
use crate::config::{Config, Mode};
use crate::store::ledger::{LedgerRow, NewQuarantine, Stage, WorkItem};
use crate::store::{SharedStore, StoreError};
use crate::unitalk::{wire::parse_call, UnitalkClient, UnitalkError};

/// The cursor of regular passes.
pub const HISTORY_STREAM: &str = "history";
/// A call still `DIALING` holds the cursor back at most this long.
pub(crate) const DIALING_HOLD_HOURS: i64 = 6;
/// How long a looked-up operator mapping is trusted.
const OPERATOR_CACHE_HOURS: i64 = 24;

/// Why a pass stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Unitalk(#[from] UnitalkError),
    #[error(transparent)]
    Bitrix24(#[from] Bitrix24Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("interrupted; the next pass continues where this one stopped")]
    Cancelled,
}

/// Everything a pass needs.
pub struct SyncCtx {
    pub cfg: Config,
    pub store: SharedStore,
    pub unitalk: UnitalkClient,
    pub b24: Bitrix24Client,
    pub clock: Clock,
    pub cancel: CancellationToken,
}

/// What a pass is asked to do.
#[derive(Debug, Clone)]
pub struct PassOptions {
    /// Plan only: nothing is written to Bitrix24 or to the store.
    pub dry_run: bool,
    /// Which cursor to use.
    pub stream: String,
    /// A fixed stretch of history (backfill): the pass covers `[cursor or start, end)` with no
    /// lookback, instead of `[cursor − lookback, now − settle)`.
    pub range: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Called after every window.
    pub progress: Option<ProgressFn>,
}

impl Default for PassOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            stream: HISTORY_STREAM.into(),
            range: None,
            progress: None,
        }
    }
}

/// Where a pass stands, reported after each window.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub windows_done: u64,
    pub windows_total: u64,
    pub pulled: u64,
    pub pushed: u64,
    pub tasks: u64,
    /// The cursor after the window.
    pub position: Option<DateTime<Utc>>,
}

/// A progress callback.
#[derive(Clone)]
pub struct ProgressFn(pub std::sync::Arc<dyn Fn(&Progress) + Send + Sync>);

impl fmt::Debug for ProgressFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProgressFn")
    }
}

/// What a pass did; printed as one line and stored in the run log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PassSummary {
    pub windows: u64,
    pub pulled: u64,
    pub new: u64,
    pub changed: u64,
    /// Pulled again with nothing new (overlap, re-checks, sweeps); pulled = new + changed +
    /// unchanged + quarantined unreadable records.
    pub unchanged: u64,
    /// Narrow re-pulls for awaited recordings.
    pub recording_rechecks: u64,
    /// Awaited recordings given up after `sync.recording_wait`.
    pub recordings_given_up: u64,
    /// Windows re-pulled by the long-call sweep.
    pub swept_windows: u64,
    /// Calls that reached Bitrix24 in this pass.
    pub pushed: u64,
    pub recordings: u64,
    pub tasks: u64,
    pub leads: u64,
    pub skipped: u64,
    pub quarantined: u64,
    /// Calls whose unknown outcome was settled by asking Bitrix24.
    pub probed: u64,
    pub bitrix24_requests: u64,
    pub unitalk_requests: u64,
    pub unitalk_units: u64,
    pub lines: u64,
    pub elapsed_ms: u64,
    /// Requests that waited at the client-side limiter, in total milliseconds.
    pub limiter_wait_ms: u64,
    /// 503 `QUERY_LIMIT_EXCEEDED` answers met (and waited out).
    pub rate_limited: u64,
    /// 429 `OPERATION_TIME_LIMIT` answers met.
    pub operation_limited: u64,
    /// OAuth refreshes.
    pub refreshes: u64,
    /// Methods paused by the portal (429), with when they resume; their calls wait.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paused: Vec<String>,
    /// Dry run: the commands that would be sent, one line each.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plan: Vec<String>,
    pub cursor: Option<String>,
}

impl fmt::Display for PassSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pulled {} calls ({} new, {} changed, {} unchanged) in {} windows; pushed {}, recordings {}, tasks {}, leads {}, skipped {}, quarantined {}; {} Bitrix24 requests, {} Unitalk requests ({} units); {:.1}s",
            self.pulled,
            self.new,
            self.changed,
            self.unchanged,
            self.windows,
            self.pushed,
            self.recordings,
            self.tasks,
            self.leads,
            self.skipped,
            self.quarantined,
            self.bitrix24_requests,
            self.unitalk_requests,
            self.unitalk_units,
            self.elapsed_ms as f64 / 1000.0
        )?;
        if self.rate_limited + self.operation_limited + self.refreshes > 0
            || self.limiter_wait_ms >= 1000
        {
            write!(
                f,
                "; waited {:.1}s for the rate limit, {} 503s, {} 429s, {} token refreshes",
                self.limiter_wait_ms as f64 / 1000.0,
                self.rate_limited,
                self.operation_limited,
                self.refreshes
            )?;
        }
        if self.recording_rechecks + self.swept_windows + self.recordings_given_up > 0 {
            write!(
                f,
                "; follow-ups: {} recording re-checks, {} long-call sweep windows, {} recordings given up",
                self.recording_rechecks, self.swept_windows, self.recordings_given_up
            )?;
        }
        if !self.paused.is_empty() {
            write!(f, "; paused by Bitrix24: {}", self.paused.join(", "))?;
        }
        Ok(())
    }
}

pub(crate) fn secs(d: std::time::Duration) -> Duration {
    Duration::from_std(d).unwrap_or(Duration::zero())
}

/// Runs one pass. See the module docs.
pub async fn run_pass(ctx: &SyncCtx, opts: &PassOptions) -> Result<PassSummary, SyncError> {
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    let counters = || {
        let b = &ctx.b24.stats;
        [
            b.requests.load(Relaxed),
            b.rate_limited.load(Relaxed),
            b.operation_limited.load(Relaxed),
            b.refreshes.load(Relaxed),
            ctx.b24.budget.waited_ms.load(Relaxed),
            ctx.unitalk.requests.load(Relaxed),
            ctx.unitalk.units.load(Relaxed),
        ]
    };
    let before = counters();
    let mut s = PassSummary::default();
    let result = pass(ctx, opts, &mut s).await;
    let after = counters();
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    s.bitrix24_requests = d[0];
    s.rate_limited = d[1];
    s.operation_limited = d[2];
    s.refreshes = d[3];
    s.limiter_wait_ms = d[4];
    s.unitalk_requests = d[5];
    s.unitalk_units = d[6];
    s.elapsed_ms = started.elapsed().as_millis() as u64;
    result.map(|_| s)
}

async fn pass(ctx: &SyncCtx, opts: &PassOptions, s: &mut PassSummary) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    refresh_lines(ctx, s).await?;
    let now = ctx.clock.now();
    let stored = ctx.store.lock().cursor(&opts.stream)?;
    let (cursor, windows) = match opts.range {
        // A backfill resumes from its own checkpoint; history that old needs no lookback.
        Some((start, end)) => {
            let cursor = stored.unwrap_or(start).max(start);
            let end = end.min(now - secs(cfg.sync.settle));
            (
                cursor,
                window::plan_windows(
                    cursor,
                    Duration::zero(),
                    Duration::zero(),
                    secs(cfg.sync.max_window),
                    end,
                ),
            )
        }
        None => {
            let cursor = stored.or(cfg.sync.start).unwrap_or(now - Duration::days(1));
            // The very first pass has nothing to look back over.
            let lookback = if stored.is_some() {
                secs(cfg.sync.lookback)
            } else {
                Duration::zero()
            };
            (
                cursor,
                window::plan_windows(
                    cursor,
                    lookback,
                    secs(cfg.sync.settle),
                    secs(cfg.sync.max_window),
                    now,
                ),
            )
        }
    };
    let total = windows.len() as u64;
    // Pull stages calls in the store and moves the cursor; the push works from the ledger, so
    // batches fill across windows. At most `stage_limit` new or changed calls wait for a push.
    let mut staged = 0u64;
    for w in windows {
        if ctx.cancel.is_cancelled() {
            return Err(SyncError::Cancelled);
        }
        s.windows += 1;
        let span = tracing::info_span!("window", start = %w.start, end = %w.end);
        let _enter = span.enter();
        let records = pull_window(ctx, w).await?;
        s.pulled += records.len() as u64;
        let before = s.new + s.changed;
        let hold = observe(ctx, &records, s)?;
        staged += s.new + s.changed - before;
        // A dry run records nothing, so an early push would plan the same calls twice.
        if staged >= u64::from(cfg.sync.stage_limit) && !opts.dry_run {
            push_due(ctx, opts, s).await?;
            staged = 0;
        }
        let position = match hold {
            Some(h) if h < w.end => h,
            _ => w.end,
        };
        // Never move the cursor backwards (a held position may be older than the stored one).
        let position = position.max(cursor);
        ctx.store
            .lock()
            .apply(&[], &[], Some((&opts.stream, position)), ctx.clock.now())?;
        s.cursor = Some(position.to_rfc3339());
        if let Some(p) = &opts.progress {
            (p.0)(&Progress {
                windows_done: s.windows,
                windows_total: total,
                pulled: s.pulled,
                pushed: s.pushed,
                tasks: s.tasks,
                position: Some(position),
            });
        }
    }
    if opts.range.is_none() {
        followup::recheck_recordings(ctx, s).await?;
        followup::sweep_long_calls(ctx, cursor, s).await?;
    }
    push_due(ctx, opts, s).await?;
    if !opts.dry_run {
        followup::watch_new(ctx, s)?;
    }
    Ok(())
}

/// A call with work due, understood.
struct Due {
    item: WorkItem,
    facts: CallFacts,
}

/// The operators' inner lines (to tell inner lines from client numbers).
pub(crate) fn known_lines(ctx: &SyncCtx) -> Result<HashSet<String>, SyncError> {
    Ok(ctx
        .store
        .lock()
        .operator_map(ctx.clock.now(), Duration::days(3650))?
        .into_keys()
        .collect())
}

/// A stored call read again and classified: its facts, when ubsync pushes it.
pub(crate) fn stored_facts(ctx: &SyncCtx, known: &HashSet<String>, raw: &str) -> Option<CallFacts> {
    let call = parse_call(
        &serde_json::from_str(raw).unwrap_or(Value::Null),
        ctx.cfg.unitalk.timezone,
    )
    .ok()?;
    match classify(&call, known, &ctx.cfg.sync) {
        Disposition::Push(f) => Some(*f),
        _ => None,
    }
}

/// Quarantines a call with work due: its next ledger row and its quarantine entry.
fn quarantine_item(
    item: &WorkItem,
    source: &'static str,
    reason: String,
) -> (LedgerRow, NewQuarantine) {
    let mut l = item.ledger.clone();
    l.stage = Stage::Quarantined;
    l.reason = Some(reason.clone());
    let q = NewQuarantine {
        source,
        call_id: Some(l.call_id.clone()),
        raw: item.raw.clone(),
        reason,
    };
    (l, q)
}

/// Sends a batch. Rate limits are waited out inside the client; here a refused connection (the
/// request certainly did not execute) is retried with growing delays. An outcome-unknown failure
/// is returned at once: it must be probed, not re-sent. Cancellation abandons the request in
/// flight; its calls stay marked in flight and the next pass probes them.
async fn send(ctx: &SyncCtx, commands: &[Command]) -> Result<BatchOutcome, SyncError> {
    let mut attempt = 0;
    loop {
        let result = tokio::select! {
            r = ctx.b24.batch(commands, false) => r,
            _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
        };
        match result {
            Ok(out) => return Ok(out),
            Err(
                e @ Bitrix24Error::Unavailable {
                    outcome_unknown: false,
                    ..
                },
            ) if attempt < 5 => {
                let delay = ctx.b24.backoff(attempt);
                tracing::warn!(error = %e, attempt, "batch not delivered; retrying");
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends lookups (read-only commands) in batches of 50 and merges their outcomes.
async fn lookup(ctx: &SyncCtx, commands: Vec<Command>) -> Result<BatchOutcome, SyncError> {
    let mut all = BatchOutcome::default();
    for chunk in commands.chunks(crate::bitrix24::batch::MAX_COMMANDS) {
        let out = send(ctx, chunk).await?;
        all.results.extend(out.results);
        all.errors.extend(out.errors);
    }
    Ok(all)
}

/// Classifies due work; calls that are skipped or cannot be pushed are settled right away.
fn understand(
    ctx: &SyncCtx,
    items: Vec<WorkItem>,
    s: &mut PassSummary,
) -> Result<Vec<Due>, SyncError> {
    let now = ctx.clock.now();
    let known = known_lines(ctx)?;
    let mut due = Vec::new();
    let mut settled = Vec::new();
    let mut quarantine = Vec::new();
    for item in items {
        let raw: Value = serde_json::from_str(&item.raw).unwrap_or(Value::Null);
        let call = match parse_call(&raw, ctx.cfg.unitalk.timezone) {
            Ok(c) => c,
            Err(e) => {
                let (l, q) = quarantine_item(&item, "unitalk", e.reason);
                quarantine.push(q);
                settled.push(l);
                continue;
            }
        };
        match classify(&call, &known, &ctx.cfg.sync) {
            Disposition::Push(facts) => due.push(Due {
                item,
                facts: *facts,
            }),
            Disposition::NotFinal
                if call.started_at > now - Duration::hours(DIALING_HOLD_HOURS) => {}
            Disposition::NotFinal => {
                let reason = format!("still DIALING {DIALING_HOLD_HOURS} hours after it started");
                let (l, q) = quarantine_item(&item, "unitalk", reason);
                quarantine.push(q);
                settled.push(l);
            }
            Disposition::Skip(reason) if item.ledger.stage == Stage::Pending => {
                let mut l = item.ledger.clone();
                l.stage = Stage::Skipped;
                l.reason = Some(reason);
                s.skipped += 1;
                settled.push(l);
            }
            Disposition::Skip(_) => {}
            Disposition::Quarantine(reason) => {
                let (l, q) = quarantine_item(&item, "unitalk", reason);
                quarantine.push(q);
                settled.push(l);
            }
        }
    }
    s.quarantined += quarantine.len() as u64;
    if !(settled.is_empty() && quarantine.is_empty()) {
        ctx.store.lock().apply(&settled, &quarantine, None, now)?;
    }
    Ok(due)
}

/// Resolves the Bitrix24 user of each operator line (cached for a day) and returns line → user.
async fn resolve_operators(
    ctx: &SyncCtx,
    lines: &HashSet<String>,
) -> Result<HashMap<String, i64>, SyncError> {
    let now = ctx.clock.now();
    let cached = ctx
        .store
        .lock()
        .operator_map(now, Duration::hours(OPERATOR_CACHE_HOURS))?;
    let mut out: HashMap<String, i64> = cached
        .iter()
        .filter_map(|(l, u)| u.flatten().map(|u| (l.clone(), u)))
        .collect();
    let missing: Vec<&String> = lines
        .iter()
        .filter(|l| !matches!(cached.get(*l), Some(Some(_))))
        .collect();
    if missing.is_empty() {
        return Ok(out);
    }
    let commands: Vec<Command> = missing
        .iter()
        .enumerate()
        .map(|(i, line)| {
            Command::new(
                format!("u{i}"),
                "user.get",
                json!({"filter": {"UF_PHONE_INNER": line, "ACTIVE": true}, "select": ["ID"]}),
            )
        })
        .collect();
    let found = lookup(ctx, commands).await?;
    let store = ctx.store.lock();
    for (i, line) in missing.iter().enumerate() {
        let Some(res) = found.results.get(&format!("u{i}")) else {
            continue;
        };
        let user = res
            .as_array()
            .and_then(|a| a.first())
            .and_then(|u| u.get("ID"))
            .and_then(as_i64);
        store.set_operator_user(line, user, now)?;
        if let Some(u) = user {
            out.insert((*line).clone(), u);
        }
    }
    Ok(out)
}

/// The Bitrix24 user a call belongs to: its operator's, else the configured default.
fn user_for(ctx: &SyncCtx, f: &CallFacts, users: &HashMap<String, i64>) -> Option<i64> {
    f.operator_line
        .as_ref()
        .and_then(|l| users.get(l).copied())
        .or(ctx.cfg.bitrix24.default_user_id.map(|u| u as i64))
}

fn no_user_reason(f: &CallFacts) -> String {
    format!(
        "no Bitrix24 user for inner line {} (no active user has it as UF_PHONE_INNER) and bitrix24.default_user_id is not set",
        f.operator_line.as_deref().unwrap_or("(none)")
    )
}

fn operator_name(f: &CallFacts) -> Option<&str> {
    f.operator_line.as_deref()
}

/// Pushes every call with work due: probes, main chains, then missed-call tasks.
async fn push_due(ctx: &SyncCtx, opts: &PassOptions, s: &mut PassSummary) -> Result<(), SyncError> {
    if !opts.dry_run {
        probe_in_flight(ctx, s).await?;
    }
    settle_finished(ctx)?;
    let items = ctx.store.lock().work_due(ctx.clock.now())?;
    if items.is_empty() {
        return Ok(());
    }
    let due = understand(ctx, items, s)?;
    let lines: HashSet<String> = due
        .iter()
        .filter_map(|d| d.facts.operator_line.clone())
        .collect();
    let users = resolve_operators(ctx, &lines).await?;
    match ctx.cfg.bitrix24.mode {
        Mode::Telephony => {
            // Until the portal has shown whether it takes attachRecord inside a batch, send one
            // batch's worth first, so a refusal is learnt before every batch carries one.
            let mut due = due;
            if ctx.store.lock().fact(FACT_ATTACH_IN_BATCH)?.is_none()
                && due.len() > 16
                && due.iter().any(|d| d.facts.link.is_some())
            {
                let rest = due.split_off(16);
                push_telephony(ctx, opts, s, due, &users).await?;
                due = rest;
            }
            push_telephony(ctx, opts, s, due, &users).await?
        }
        Mode::Activity => push_activity(ctx, opts, s, due, &users).await?,
    }
    if ctx.cfg.tasks.enabled {
        push_tasks(ctx, opts, s, &users).await?;
    }
    Ok(())
}

/// Dry run: the tasks missed calls would get once they are in Bitrix24.
fn missed_task_lines(ctx: &SyncCtx, facts: &HashMap<String, (CallFacts, String)>) -> Vec<String> {
    if !ctx.cfg.tasks.enabled {
        return Vec::new();
    }
    let mut v: Vec<&CallFacts> = facts
        .values()
        .map(|(f, _)| f)
        .filter(|f| f.missed)
        .collect();
    v.sort_by_key(|f| f.started_at);
    v.into_iter()
        .map(|f| format!("call {}: tasks.task.add (\"{}\", responsible resolved once the call is in Bitrix24)", f.id, ctx.cfg.tasks.title.replace("{phone}", &f.client_number)))
        .collect()
}

/// Marks `done` the finished calls with nothing left to do (no recording, no task due).
fn settle_finished(ctx: &SyncCtx) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    let items = ctx.store.lock().work_due(now)?;
    let known = known_lines(ctx)?;
    let mut rows = Vec::new();
    for w in items
        .into_iter()
        .filter(|w| w.ledger.stage == Stage::Finished && w.ledger.task_in_flight_since.is_none())
    {
        if let Some(f) = stored_facts(ctx, &known, &w.raw) {
            let row = plan::settle_stage(&ctx.cfg, &f, w.ledger.clone(), &w.content_hash);
            if row.stage == Stage::Done {
                rows.push(row);
            }
        }
    }
    if !rows.is_empty() {
        ctx.store.lock().apply(&rows, &[], None, now)?;
    }
    Ok(())
}

fn describe_plan(p: &CallPlan) -> Vec<String> {
    p.commands
        .iter()
        .map(|c| format!("call {}: {}", p.call_id, c.encode()))
        .collect()
}

/// Sends planned batches: marks their calls in flight, sends, and records each call's outcome
/// with `record`, all of one batch in one transaction. Plans that use a method the portal paused
/// (429) wait for a later pass; an error an admin must fix stops the pass after recording.
async fn send_plans(
    ctx: &SyncCtx,
    plans: Vec<(CallPlan, LedgerRow, bool)>,
    mut record: impl FnMut(&str, LedgerRow, &BatchOutcome) -> (LedgerRow, Option<String>),
    s: &mut PassSummary,
) -> Result<(), SyncError> {
    let by_id: HashMap<String, (LedgerRow, bool)> = plans
        .iter()
        .map(|(p, l, f)| (p.call_id.clone(), (l.clone(), *f)))
        .collect();
    for batch in plan::pack(plans.into_iter().map(|(p, _, _)| p).collect()) {
        if ctx.cancel.is_cancelled() {
            return Err(SyncError::Cancelled);
        }
        let now = ctx.clock.now();
        let (batch, held): (Vec<CallPlan>, Vec<CallPlan>) = batch.into_iter().partition(|p| {
            p.commands
                .iter()
                .all(|c| ctx.b24.operating.paused_until(&c.method, now).is_none())
        });
        for p in &held {
            for c in &p.commands {
                if let Some(until) = ctx.b24.operating.paused_until(&c.method, now) {
                    let note = format!("{} until {}", c.method, until.format("%H:%M:%S UTC"));
                    if !s.paused.contains(&note) {
                        s.paused.push(note);
                    }
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let originals: Vec<LedgerRow> = batch.iter().map(|p| by_id[&p.call_id].0.clone()).collect();
        let marked: Vec<LedgerRow> = batch
            .iter()
            .map(|p| {
                let (mut l, non_idempotent) = by_id[&p.call_id].clone();
                if non_idempotent {
                    l.in_flight_since = Some(now);
                    if matches!(l.stage, Stage::Pending | Stage::Registered) {
                        l.stage = Stage::InFlight;
                    }
                }
                l
            })
            .collect();
        ctx.store.lock().apply(&marked, &[], None, now)?;
        let commands: Vec<Command> = batch
            .iter()
            .flat_map(|p| p.commands.iter().cloned())
            .collect();
        let out = match send(ctx, &commands).await {
            Ok(out) => out,
            Err(e) => {
                let unknown = matches!(&e, SyncError::Bitrix24(b) if b.outcome_unknown())
                    || matches!(e, SyncError::Cancelled);
                if !unknown {
                    // Nothing was executed: put the rows back as they were.
                    ctx.store
                        .lock()
                        .apply(&originals, &[], None, ctx.clock.now())?;
                }
                return Err(e);
            }
        };
        let now = ctx.clock.now();
        let mut rows = Vec::new();
        let mut quarantine = Vec::new();
        for (p, original) in batch.iter().zip(originals) {
            let (row, reason) = record(&p.call_id, original, &out);
            if let Some(reason) = reason {
                s.quarantined += 1;
                quarantine.push(NewQuarantine {
                    source: "bitrix24",
                    call_id: Some(p.call_id.clone()),
                    raw: p
                        .commands
                        .iter()
                        .map(Command::encode)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    reason,
                });
            }
            rows.push(row);
        }
        ctx.store.lock().apply(&rows, &quarantine, None, now)?;
        // Methods the portal paused (429) in this batch: their calls wait for a later pass.
        for c in &commands {
            if let Some(until) = ctx.b24.operating.paused_until(&c.method, now) {
                let note = format!("{} until {}", c.method, until.format("%H:%M:%S UTC"));
                if !s.paused.contains(&note) {
                    s.paused.push(note);
                }
            }
        }
        if let Some(e) = out
            .errors
            .values()
            .find(|e| plan::is_fatal_code(&e.effective_code()))
        {
            let code = e.effective_code();
            return Err(Bitrix24Error::Auth {
                hint: crate::bitrix24::auth_hint(&code)
                    .unwrap_or("check the application's or webhook's rights in the portal")
                    .into(),
                code,
                description: e.description.clone(),
            }
            .into());
        }
    }
    Ok(())
}

/// Fact: "no" once the portal refused `attachRecord` inside a batch.
const FACT_ATTACH_IN_BATCH: &str = "bitrix24.attach_record_in_batch";

async fn push_telephony(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    due: Vec<Due>,
    users: &HashMap<String, i64>,
) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    let attach_in_batch = ctx.store.lock().fact(FACT_ATTACH_IN_BATCH)?.as_deref() != Some("no");
    let mut plans = Vec::new();
    let mut facts: HashMap<String, (CallFacts, String)> = HashMap::new();
    let mut unassigned = Vec::new();
    for d in due {
        let l = &d.item.ledger;
        if l.stage == Stage::Finished && !plan::needs_recording(&d.facts, l) {
            continue;
        }
        let Some(user) = user_for(ctx, &d.facts, users) else {
            unassigned.push(d);
            continue;
        };
        let commands = plan::telephony_chain(&ctx.cfg, &d.facts, l, user, attach_in_batch);
        if commands.is_empty() {
            continue;
        }
        let non_idempotent = commands
            .iter()
            .any(|c| c.method != "telephony.externalCall.attachRecord");
        let mut l = l.clone();
        l.responsible_id = Some(user);
        facts.insert(
            d.facts.id.clone(),
            (d.facts.clone(), d.item.content_hash.clone()),
        );
        plans.push((
            CallPlan {
                call_id: d.facts.id.clone(),
                commands,
            },
            l,
            non_idempotent,
        ));
    }
    settle_unassigned(ctx, s, unassigned, now)?;
    if opts.dry_run {
        s.plan
            .extend(plans.iter().flat_map(|(p, _, _)| describe_plan(p)));
        if !attach_in_batch {
            s.plan.extend(facts.values().filter(|(f, _)| f.link.is_some()).map(|(f, _)| format!("call {}: telephony.externalCall.attachRecord (standalone: this portal refuses it in a batch)", f.id)));
        }
        s.plan.extend(missed_task_lines(ctx, &facts));
        return Ok(());
    }
    let cfg = &ctx.cfg;
    let mut pushed = 0;
    let mut recordings = 0;
    let mut refused_in_batch = false;
    let mut accepted_in_batch = false;
    send_plans(
        ctx,
        plans,
        |id, l, out| {
            let (f, hash) = &facts[id];
            let before = l.stage;
            let had_record = l.record_url.clone();
            if out
                .errors
                .get(&plan::key("a", id))
                .is_some_and(|e| e.effective_code() == "ERROR_BATCH_METHOD_NOT_ALLOWED")
            {
                refused_in_batch = true;
            }
            accepted_in_batch |= out.results.contains_key(&plan::key("a", id));
            let (row, reason) = plan::record_chain(cfg, f, l, out, hash, now);
            if matches!(row.stage, Stage::Finished | Stage::Done)
                && !matches!(before, Stage::Finished | Stage::Done)
            {
                pushed += 1;
            }
            if row.record_url.is_some() && row.record_url != had_record {
                recordings += 1;
            }
            (row, reason)
        },
        s,
    )
    .await?;
    s.pushed += pushed;
    s.recordings += recordings;
    if refused_in_batch {
        tracing::warn!("this portal refuses attachRecord inside a batch; recordings now go as separate requests");
        ctx.store.lock().set_fact(FACT_ATTACH_IN_BATCH, "no", now)?;
    } else if accepted_in_batch && attach_in_batch {
        ctx.store
            .lock()
            .set_fact(FACT_ATTACH_IN_BATCH, "yes", now)?;
    }
    if refused_in_batch || !attach_in_batch {
        attach_standalone(ctx, s).await?;
    }
    Ok(())
}

/// Attaches recordings one request at a time (still through the request budget), for portals
/// that refuse `attachRecord` inside a batch.
async fn attach_standalone(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    let items = ctx.store.lock().work_due(ctx.clock.now())?;
    let known = known_lines(ctx)?;
    for w in items
        .into_iter()
        .filter(|w| w.ledger.stage == Stage::Finished)
    {
        let Some(f) = stored_facts(ctx, &known, &w.raw) else {
            continue;
        };
        if !plan::needs_recording(&f, &w.ledger) {
            continue;
        }
        let Some(command) = plan::attach_record(
            cfg,
            &f,
            json!(w.ledger.b24_call_id.clone().unwrap_or_default()),
        ) else {
            continue;
        };
        let result = tokio::select! {
            r = ctx.b24.call(&command.method, Value::Object(command.params.clone())) => r,
            _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
        };
        let now = ctx.clock.now();
        let (row, reason) = match result {
            Ok(_) => {
                let mut l = w.ledger.clone();
                l.record_url = f.link.clone();
                s.recordings += 1;
                (plan::settle_stage(cfg, &f, l, &w.content_hash), None)
            }
            Err(Bitrix24Error::Api {
                code, description, ..
            }) => plan::fail(
                w.ledger.clone(),
                plan::classify_error(
                    &command.method,
                    &crate::bitrix24::wire::ErrorBody { code, description },
                ),
                now,
            ),
            Err(e) if e.is_retryable() && !e.needs_admin() => {
                tracing::warn!(error = %e, call = %f.id, "recording not attached; a later pass retries");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let quarantine: Vec<NewQuarantine> = reason
            .map(|reason| NewQuarantine {
                source: "bitrix24",
                call_id: Some(f.id.clone()),
                raw: command.encode(),
                reason,
            })
            .into_iter()
            .collect();
        s.quarantined += quarantine.len() as u64;
        ctx.store.lock().apply(&[row], &quarantine, None, now)?;
    }
    Ok(())
}

fn settle_unassigned(
    ctx: &SyncCtx,
    s: &mut PassSummary,
    unassigned: Vec<Due>,
    now: DateTime<Utc>,
) -> Result<(), SyncError> {
    if unassigned.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::new();
    let mut quarantine = Vec::new();
    for d in unassigned {
        let (l, q) = quarantine_item(&d.item, "bitrix24", no_user_reason(&d.facts));
        quarantine.push(q);
        rows.push(l);
    }
    s.quarantined += quarantine.len() as u64;
    ctx.store.lock().apply(&rows, &quarantine, None, now)?;
    Ok(())
}

/// Looks numbers up with `crm.duplicate.findbycomm` (20 per command) and returns the best
/// entity per number: a contact, else a company, else a lead (lowest id first).
async fn find_entities(
    ctx: &SyncCtx,
    numbers: &[String],
) -> Result<HashMap<String, Entity>, SyncError> {
    let mut out = HashMap::new();
    let chunks: Vec<&[String]> = numbers.chunks(20).collect();
    for (ci, chunk) in chunks.iter().enumerate() {
        // One number per entity type is ambiguous across a chunk; ask per number in the chunk.
        let commands: Vec<Command> = chunk
            .iter()
            .enumerate()
            .map(|(i, n)| {
                Command::new(
                    format!("d{ci}_{i}"),
                    "crm.duplicate.findbycomm",
                    json!({"type": "PHONE", "values": [n]}),
                )
            })
            .collect();
        let found = lookup(ctx, commands).await?;
        for (i, n) in chunk.iter().enumerate() {
            let Some(Value::Object(m)) = found.results.get(&format!("d{ci}_{i}")) else {
                continue;
            };
            for kind in ["CONTACT", "COMPANY", "LEAD"] {
                let id = m
                    .get(kind)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().filter_map(as_i64).min());
                if let Some(id) = id {
                    out.insert(
                        n.clone(),
                        Entity {
                            kind: kind.into(),
                            id,
                        },
                    );
                    break;
                }
            }
        }
    }
    Ok(out)
}

async fn push_activity(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    due: Vec<Due>,
    users: &HashMap<String, i64>,
) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    let now = ctx.clock.now();
    // Follow-ups first: a recording link that appeared after the activity was written.
    let mut updates = Vec::new();
    let mut fresh = Vec::new();
    let mut unassigned = Vec::new();
    for d in due {
        match d.item.ledger.stage {
            Stage::Pending | Stage::InFlight => match user_for(ctx, &d.facts, users) {
                Some(_) => fresh.push(d),
                None => unassigned.push(d),
            },
            _ if plan::needs_recording(&d.facts, &d.item.ledger)
                || plan::needs_activity_refresh(cfg, &d.item.ledger, &d.item.content_hash) =>
            {
                if let Some(c) =
                    plan::activity_update(cfg, &d.facts, &d.item.ledger, operator_name(&d.facts))
                {
                    updates.push((d, c));
                }
            }
            _ => {}
        }
    }
    settle_unassigned(ctx, s, unassigned, now)?;

    let mut numbers: Vec<String> = fresh
        .iter()
        .map(|d| d.facts.client_number.clone())
        .collect();
    numbers.sort();
    numbers.dedup();
    let mut entities = find_entities(ctx, &numbers).await?;

    // Unknown numbers: one lead per number, created before any activity refers to it.
    let unknown: Vec<String> = numbers
        .iter()
        .filter(|n| !entities.contains_key(*n))
        .cloned()
        .collect();
    if cfg.activity.create_leads && !unknown.is_empty() {
        let first_call: HashMap<&String, &Due> = fresh
            .iter()
            .rev()
            .map(|d| (&d.facts.client_number, d))
            .collect();
        let commands: Vec<Command> = unknown
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let d = first_call[n];
                let assigned = user_for(ctx, &d.facts, users).unwrap_or(1);
                Command::new(
                    format!("l{i}"),
                    "crm.lead.add",
                    json!({"fields": {
                        "TITLE": cfg.activity.lead_title.replace("{phone}", n),
                        "PHONE": [{"VALUE": n, "VALUE_TYPE": "WORK"}],
                        "SOURCE_ID": "CALL", "ASSIGNED_BY_ID": assigned,
                        "ORIGINATOR_ID": "ubsync", "ORIGIN_ID": d.facts.external_id,
                    }}),
                )
            })
            .collect();
        if opts.dry_run {
            s.plan.extend(
                commands
                    .iter()
                    .map(|c| format!("lead for {}: {}", c.params["fields"]["TITLE"], c.encode())),
            );
        } else {
            let out = lookup(ctx, commands).await?;
            for (i, n) in unknown.iter().enumerate() {
                match out.results.get(&format!("l{i}")).and_then(as_i64) {
                    Some(id) => {
                        s.leads += 1;
                        entities.insert(
                            n.clone(),
                            Entity {
                                kind: "LEAD".into(),
                                id,
                            },
                        );
                    }
                    None => {
                        tracing::warn!(number = %n, error = ?out.errors.get(&format!("l{i}")), "lead creation failed; the calls wait for the next pass")
                    }
                }
            }
        }
    }

    let mut plans = Vec::new();
    let mut facts: HashMap<String, (CallFacts, String)> = HashMap::new();
    let mut skipped = Vec::new();
    for d in fresh {
        let Some(entity) = entities.get(&d.facts.client_number).cloned() else {
            if !cfg.activity.create_leads {
                let mut l = d.item.ledger.clone();
                l.stage = Stage::Skipped;
                l.reason =
                    Some("no CRM entity has this number and activity.create_leads = false".into());
                skipped.push(l);
            }
            continue;
        };
        let user = user_for(ctx, &d.facts, users).expect("checked above");
        let mut l = d.item.ledger.clone();
        l.responsible_id = Some(user);
        l.crm_entity_type = Some(entity.kind.clone());
        l.crm_entity_id = Some(entity.id);
        let command = plan::activity_add(cfg, &d.facts, &entity, user, operator_name(&d.facts));
        facts.insert(
            d.facts.id.clone(),
            (d.facts.clone(), d.item.content_hash.clone()),
        );
        plans.push((
            CallPlan {
                call_id: d.facts.id.clone(),
                commands: vec![command],
            },
            l,
            true,
        ));
    }
    if opts.dry_run {
        s.plan
            .extend(plans.iter().flat_map(|(p, _, _)| describe_plan(p)));
        s.plan.extend(
            updates
                .iter()
                .map(|(d, c)| format!("call {}: {}", d.facts.id, c.encode())),
        );
        s.plan.extend(missed_task_lines(ctx, &facts));
        return Ok(());
    }
    if !skipped.is_empty() {
        s.skipped += skipped.len() as u64;
        ctx.store.lock().apply(&skipped, &[], None, now)?;
    }
    let mut pushed = 0;
    send_plans(
        ctx,
        plans,
        |id, l, out| {
            let (f, hash) = &facts[id];
            let (row, reason) = plan::record_activity(cfg, f, l, out, hash, now);
            if matches!(row.stage, Stage::Finished | Stage::Done) {
                pushed += 1;
            }
            (row, reason)
        },
        s,
    )
    .await?;
    s.pushed += pushed;

    let upd_facts: HashMap<String, (CallFacts, String)> = updates
        .iter()
        .map(|(d, _)| {
            (
                d.facts.id.clone(),
                (d.facts.clone(), d.item.content_hash.clone()),
            )
        })
        .collect();
    let upd_plans = updates
        .into_iter()
        .map(|(d, c)| {
            (
                CallPlan {
                    call_id: d.facts.id.clone(),
                    commands: vec![c],
                },
                d.item.ledger,
                false,
            )
        })
        .collect();
    let mut recordings = 0;
    send_plans(
        ctx,
        upd_plans,
        |id, l, out| {
            let (f, hash) = &upd_facts[id];
            let (row, reason) = plan::record_activity_update(cfg, f, l, out, hash, now);
            if f.link.is_some() && row.record_url == f.link && row.stage != Stage::Quarantined {
                recordings += 1;
            }
            (row, reason)
        },
        s,
    )
    .await?;
    s.recordings += recordings;
    Ok(())
}

/// Responsible users of CRM entities, by (kind, id).
async fn entity_responsibles(
    ctx: &SyncCtx,
    entities: &[Entity],
    numbers: &[String],
) -> Result<(HashMap<(String, i64), i64>, HashMap<String, (Entity, i64)>), SyncError> {
    let mut by_entity = HashMap::new();
    let mut by_number = HashMap::new();
    match ctx.cfg.bitrix24.mode {
        Mode::Telephony => {
            let commands: Vec<Command> = numbers
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    Command::new(
                        format!("s{i}"),
                        "telephony.externalCall.searchCrmEntities",
                        json!({"PHONE_NUMBER": n}),
                    )
                })
                .collect();
            let found = lookup(ctx, commands).await?;
            for (i, n) in numbers.iter().enumerate() {
                let Some(Value::Array(list)) = found.results.get(&format!("s{i}")) else {
                    continue;
                };
                for e in list {
                    let (Some(kind), Some(id), Some(resp)) = (
                        e.get("CRM_ENTITY_TYPE").and_then(as_text),
                        e.get("CRM_ENTITY_ID").and_then(as_i64),
                        e.get("ASSIGNED_BY_ID").and_then(as_i64),
                    ) else {
                        continue;
                    };
                    by_entity.insert((kind.clone(), id), resp);
                    by_number
                        .entry(n.clone())
                        .or_insert((Entity { kind, id }, resp));
                }
            }
        }
        Mode::Activity => {
            let mut commands = Vec::new();
            for kind in ["CONTACT", "LEAD", "COMPANY"] {
                let ids: Vec<i64> = entities
                    .iter()
                    .filter(|e| e.kind == kind)
                    .map(|e| e.id)
                    .collect();
                for (ci, chunk) in ids.chunks(50).enumerate() {
                    let method = format!("crm.{}.list", kind.to_lowercase());
                    commands.push(Command::new(
                        format!("e_{}_{ci}", kind.to_lowercase()),
                        method,
                        json!({"filter": {"@ID": chunk}, "select": ["ID", "ASSIGNED_BY_ID"]}),
                    ));
                }
            }
            let keys: Vec<(String, String)> = commands
                .iter()
                .map(|c| (c.key.clone(), c.method.clone()))
                .collect();
            let found = lookup(ctx, commands).await?;
            for (k, method) in keys {
                let kind = method
                    .trim_start_matches("crm.")
                    .trim_end_matches(".list")
                    .to_uppercase();
                let Some(Value::Array(list)) = found.results.get(&k) else {
                    continue;
                };
                for e in list {
                    if let (Some(id), Some(resp)) = (
                        e.get("ID").and_then(as_i64),
                        e.get("ASSIGNED_BY_ID").and_then(as_i64),
                    ) {
                        by_entity.insert((kind.clone(), id), resp);
                    }
                }
            }
        }
    }
    Ok((by_entity, by_number))
}

/// Creates the follow-up task of every missed incoming call that is in Bitrix24 and has none.
/// Responsible: the matched CRM entity's responsible user, else the operator of the line that
/// rang, else `bitrix24.default_user_id`.
async fn push_tasks(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
    users: &HashMap<String, i64>,
) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    let now = ctx.clock.now();
    let items = ctx.store.lock().work_due(now)?;
    let known = known_lines(ctx)?;
    let mut due = Vec::new();
    for item in items {
        if !matches!(item.ledger.stage, Stage::Finished)
            || item.ledger.task_id.is_some()
            || item.ledger.task_in_flight_since.is_some()
        {
            continue;
        }
        if let Some(f) =
            stored_facts(ctx, &known, &item.raw).filter(|f| plan::needs_task(cfg, f, &item.ledger))
        {
            due.push(Due { item, facts: f });
        }
    }
    if due.is_empty() {
        return Ok(());
    }
    let entities: Vec<Entity> = due
        .iter()
        .filter_map(|d| {
            Some(Entity {
                kind: d.item.ledger.crm_entity_type.clone()?,
                id: d.item.ledger.crm_entity_id?,
            })
        })
        .collect();
    let mut numbers: Vec<String> = due.iter().map(|d| d.facts.client_number.clone()).collect();
    numbers.sort();
    numbers.dedup();
    let (by_entity, by_number) = entity_responsibles(ctx, &entities, &numbers).await?;
    let mut plans = Vec::new();
    let mut facts: HashMap<String, (CallFacts, String)> = HashMap::new();
    let mut unassigned = Vec::new();
    for d in due {
        let l = &d.item.ledger;
        let ledger_entity = l
            .crm_entity_type
            .clone()
            .zip(l.crm_entity_id)
            .map(|(kind, id)| Entity { kind, id });
        let entity = ledger_entity.clone().or_else(|| {
            by_number
                .get(&d.facts.client_number)
                .map(|(e, _)| e.clone())
        });
        let responsible = ledger_entity
            .as_ref()
            .and_then(|e| by_entity.get(&(e.kind.clone(), e.id)).copied())
            .or_else(|| by_number.get(&d.facts.client_number).map(|(_, r)| *r))
            .or_else(|| {
                d.facts
                    .operator_line
                    .as_ref()
                    .and_then(|line| users.get(line).copied())
            })
            .or(cfg.bitrix24.default_user_id.map(|u| u as i64));
        let Some(responsible) = responsible else {
            unassigned.push(d);
            continue;
        };
        let mut l = l.clone();
        l.responsible_id = Some(responsible);
        let command = plan::task_add(
            cfg,
            &d.facts,
            responsible,
            entity.as_ref(),
            operator_name(&d.facts),
        );
        facts.insert(
            d.facts.id.clone(),
            (d.facts.clone(), d.item.content_hash.clone()),
        );
        plans.push((
            CallPlan {
                call_id: d.facts.id.clone(),
                commands: vec![command],
            },
            l,
        ));
    }
    settle_unassigned(ctx, s, unassigned, now)?;
    if opts.dry_run {
        s.plan
            .extend(plans.iter().flat_map(|(p, _)| describe_plan(p)));
        return Ok(());
    }
    // Tasks are not idempotent: each is marked in flight with its responsible user first, so a
    // pass that dies before recording can find it again instead of adding a second one.
    let marked: Vec<(CallPlan, LedgerRow, bool)> = plans
        .into_iter()
        .map(|(p, mut l)| {
            l.task_in_flight_since = Some(now);
            (p, l, false)
        })
        .collect();
    let mut tasks = 0;
    send_plans(
        ctx,
        marked,
        |id, l, out| {
            let (f, hash) = &facts[id];
            let (row, reason) = plan::record_task(cfg, f, l, out, hash, now);
            if row.task_id.is_some() {
                tasks += 1;
            }
            (row, reason)
        },
        s,
    )
    .await?;
    s.tasks += tasks;
    Ok(())
}

/// Settles calls whose last batch has an unknown outcome by asking Bitrix24 what it holds.
async fn probe_in_flight(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    // In-flight rows are due whatever their retry time.
    let rows: Vec<WorkItem> = ctx
        .store
        .lock()
        .work_due(now + Duration::days(36500))?
        .into_iter()
        .filter(|w| w.ledger.stage == Stage::InFlight || w.ledger.task_in_flight_since.is_some())
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    tracing::info!(
        calls = rows.len(),
        "probing Bitrix24 for calls whose last batch had an unknown outcome"
    );
    let mut commands = Vec::new();
    for w in &rows {
        let ext = format!("unitalk-{}", w.ledger.call_id);
        if w.ledger.stage == Stage::InFlight {
            commands.push(match ctx.cfg.bitrix24.mode {
                Mode::Telephony => Command::new(key("p", &w.ledger.call_id), "voximplant.statistic.get", json!({"FILTER": {"EXTERNAL_CALL_ID": ext}})),
                Mode::Activity => Command::new(
                    key("p", &w.ledger.call_id),
                    "crm.activity.list",
                    json!({"filter": {"ORIGINATOR_ID": "ubsync", "ORIGIN_ID": ext}, "select": ["ID", "OWNER_TYPE_ID", "OWNER_ID"]}),
                ),
            });
        }
        if let (Some(since), Some(resp)) = (w.ledger.task_in_flight_since, w.ledger.responsible_id)
        {
            commands.push(Command::new(
                key("q", &w.ledger.call_id),
                "tasks.task.list",
                json!({"filter": {"RESPONSIBLE_ID": resp, ">=CREATED_DATE": crate::timezone::rfc3339_in(since - Duration::minutes(10), ctx.cfg.bitrix24.timezone)},
                       "select": ["ID", "XML_ID", "DESCRIPTION"]}),
            ));
        }
    }
    let found = lookup(ctx, commands).await?;
    let mut updated = Vec::new();
    for w in rows {
        let mut l = w.ledger.clone();
        let ext = format!("unitalk-{}", l.call_id);
        if l.stage == Stage::InFlight {
            let Some(res) = found.results.get(&key("p", &l.call_id)) else {
                continue; // the probe itself failed; try again next pass
            };
            let hit = res.as_array().and_then(|a| a.first()).cloned();
            l.in_flight_since = None;
            match (hit, ctx.cfg.bitrix24.mode) {
                (Some(row), Mode::Telephony) => {
                    l.b24_call_id = row.get("CALL_ID").and_then(as_text).or(l.b24_call_id);
                    l.b24_stat_id = row.get("ID").and_then(as_i64);
                    l.b24_activity_id = row.get("CRM_ACTIVITY_ID").and_then(as_i64);
                    if let (Some(k), Some(id)) = (
                        row.get("CRM_ENTITY_TYPE").and_then(as_text),
                        row.get("CRM_ENTITY_ID").and_then(as_i64),
                    ) {
                        l.crm_entity_type = Some(k);
                        l.crm_entity_id = Some(id);
                    }
                    let has_record = row.get("CALL_RECORD_URL").and_then(as_text).is_some()
                        || row.get("RECORD_FILE_ID").and_then(as_text).is_some();
                    if has_record {
                        let raw: Value = serde_json::from_str(&w.raw).unwrap_or(Value::Null);
                        l.record_url = raw.get("link").and_then(as_text);
                    }
                    l.stage = Stage::Finished;
                }
                (Some(row), Mode::Activity) => {
                    l.b24_activity_id = row.get("ID").and_then(as_i64);
                    l.stage = Stage::Finished;
                }
                (None, _) => {
                    l.stage = if l.b24_call_id.is_some() {
                        Stage::Registered
                    } else {
                        Stage::Pending
                    }
                }
            }
            s.probed += 1;
        }
        if l.task_in_flight_since.is_some() {
            if let Some(Value::Object(res)) = found.results.get(&key("q", &l.call_id)) {
                let tasks = res
                    .get("tasks")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let mine = tasks.iter().find(|t| {
                    t.get("xmlId").and_then(as_text).as_deref() == Some(ext.as_str())
                        || t.get("description")
                            .and_then(Value::as_str)
                            .is_some_and(|d| d.contains(&ext))
                });
                l.task_id = mine.and_then(|t| t.get("id")).and_then(as_i64);
                l.task_in_flight_since = None;
                s.probed += 1;
            }
        }
        updated.push(l);
    }
    ctx.store.lock().apply(&updated, &[], None, now)?;
    // Rows settled as finished may have nothing left to do; the planner re-reads them.
    Ok(())
}
