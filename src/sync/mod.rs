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
//! modules [`call`], [`window`], [`plan`] and [`ledger`]; `gather` classifies due work and does
//! the read-only lookups, `execute` is the only writer to Bitrix24; this module orders the pass.

mod activity;
pub mod call;
mod clicks;
mod client_tasks;
mod events;
mod execute;
mod followup;
mod gather;
mod heartbeat;
pub mod ledger;
mod line_alerts;
mod notify;
pub mod plan;
mod probe;
mod pull;
mod push_plan;
use push_plan::{quarantine_item, scripted, Chain};
pub mod reconcile;
mod record_check;
pub mod runlog;
mod verify;
use heartbeat::heartbeat;
use verify::{dry_run_lookups, verify_by_listing, verify_policy};
mod summary;
mod tasks;
mod telephony;
pub mod window;

use activity::{entity_responsibles, push_activity};
pub use clicks::{bind_events, bound_events, poll_offline, FACT_UNINSTALLED};

/// The Bitrix24 events ubsync binds.
pub fn clicks_events() -> &'static [&'static str] {
    clicks::EVENTS
}
use execute::{
    describe_plan, lookup, note_paused, send_plans, settle_quarantines, settle_script_errors,
    settle_unassigned, survivable, write_untracked,
};
pub use followup::SWEEP_STREAM;
use gather::{operator_name, resolve_operators, understand, user_for};
pub use line_alerts::alert_lines;
use probe::probe_in_flight;
pub use pull::estimate_calls;
pub use pull::refresh_lines;
use pull::{observe, pull_window};
pub use summary::{PassSummary, Progress, ProgressFn};
use tasks::push_tasks;
use telephony::{push_telephony, FACT_ATTACH_IN_BATCH};

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use self::call::{classify, CallFacts, Disposition};
use self::plan::{key, CallPlan, Entity};
use crate::bitrix24::api;
use crate::bitrix24::batch::Command;
use crate::bitrix24::wire::{as_i64, BatchOutcome};
use crate::bitrix24::{Bitrix24Client, Bitrix24Error};
use crate::clock::Clock;
use crate::config::{Config, Mode};
use crate::store::ledger::{LedgerRow, NewQuarantine, Stage, WorkItem};
use crate::store::{SharedStore, StoreError};
use crate::unitalk::{UnitalkClient, UnitalkError};

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
    #[error("Bitrix24 reported the application uninstalled from the portal ({at}); install it again (`ubsync auth serve`, then add the application in the portal), then remove the state fact with `ubsync auth forget-install`")]
    Uninstalled { at: String },
    #[error("unitalk.call_id_field is `{configured}`, but this state file's calls are keyed by `{stored}`: changing it would push every call to Bitrix24 again. Set it back to \"{stored}\", or start a new state file (then `ubsync reconcile` before trusting it)")]
    IdentityChanged { stored: String, configured: String },
}

/// Everything a pass needs.
pub struct SyncCtx {
    pub cfg: Config,
    /// Downloads recordings for `recordings.delivery = "upload"`.
    pub recordings: reqwest::Client,
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
    /// Only the events waiting in the inbox, then a push (the daemon, after a webhook): no
    /// pull from Unitalk.
    pub events_only: bool,
    /// A pass that got no answer from Bitrix24 asks it one cheap question once half of
    /// `health.max_age` has passed since its last answer (`sync` from the command line and the
    /// daemon's sync job: the passes whose health is watched).
    pub heartbeat: bool,
}

impl Default for PassOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            stream: HISTORY_STREAM.into(),
            range: None,
            progress: None,
            events_only: false,
            heartbeat: false,
        }
    }
}

/// How far the system clock may run ahead of Unitalk's before Unitalk's time is used.
const CLOCK_TOLERANCE_MINUTES: i64 = 2;

/// Now, checked against a second source: when the system clock runs ahead of Unitalk's `Date`
/// (a clock that jumped forward), windows are planned up to Unitalk's time, so the cursor never
/// moves past records Unitalk cannot have yet.
fn trusted_now(ctx: &SyncCtx) -> DateTime<Utc> {
    let local = ctx.clock.now();
    match ctx.unitalk.server_now() {
        Some(server) if local > server + Duration::minutes(CLOCK_TOLERANCE_MINUTES) => {
            tracing::warn!(local = %local, unitalk = %server, "the system clock is ahead of Unitalk's; planning with Unitalk's time (check NTP)");
            server
        }
        _ => local,
    }
}

/// Parses a Unitalk record with this configuration's zone and identity field.
pub(crate) fn parse(
    ctx: &SyncCtx,
    raw: &Value,
) -> Result<crate::unitalk::Call, crate::unitalk::RecordError> {
    crate::unitalk::wire::parse_call_as(
        raw,
        ctx.cfg.unitalk.timezone,
        &ctx.cfg.unitalk.call_id_field,
    )
}

/// The identity field is stored with the ledger: changing it would give every call a new id
/// and push it again, so a pass refuses a configuration that differs from the stored one.
pub const FACT_CALL_ID_FIELD: &str = "unitalk.call_id_field";

/// Fact: calls that started before this instant are looked up in Bitrix24 before their first
/// registration. Set when a pass finds the ledger empty (a new install, or a lost state file:
/// nothing then tells what an earlier one pushed); an older, populated store gets the epoch.
pub const FACT_VERIFY_BEFORE: &str = "ledger.verify_before";

fn check_identity(ctx: &SyncCtx) -> Result<(), SyncError> {
    let want = &ctx.cfg.unitalk.call_id_field;
    let store = ctx.store.lock();
    match store.fact(FACT_CALL_ID_FIELD)? {
        Some(have) if have != *want => Err(SyncError::IdentityChanged {
            stored: have,
            configured: want.clone(),
        }),
        Some(_) => Ok(()),
        None => {
            // A store from before this setting was keyed by `id`.
            let had_calls = !store.ledger_rows()?.is_empty();
            let have = if had_calls {
                "id".to_string()
            } else {
                want.clone()
            };
            store.set_fact(FACT_CALL_ID_FIELD, &have, ctx.clock.now())?;
            if have != *want {
                return Err(SyncError::IdentityChanged {
                    stored: have,
                    configured: want.clone(),
                });
            }
            Ok(())
        }
    }
}

pub(crate) fn secs(d: std::time::Duration) -> Duration {
    Duration::from_std(d).unwrap_or(Duration::zero())
}

/// Runs one pass. See the module docs.
pub async fn run_pass(ctx: &SyncCtx, opts: &PassOptions) -> Result<PassSummary, SyncError> {
    let (s, r) = run_pass_partial(ctx, opts).await;
    r.map(|_| s)
}

/// [`run_pass`], with what the pass did up to its end even when it failed or was interrupted
/// (the run log keeps it: a cancelled backfill still says what it created).
pub async fn run_pass_partial(
    ctx: &SyncCtx,
    opts: &PassOptions,
) -> (PassSummary, Result<(), SyncError>) {
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
            b.retried.load(Relaxed),
        ]
    };
    let before = counters();
    let answered = ctx.b24.stats.answered.load(Relaxed);
    let mut s = PassSummary {
        progress: opts.progress.clone(),
        ..PassSummary::default()
    };
    let mut result = pass(ctx, opts, &mut s).await;
    if result.is_ok() && opts.heartbeat && !opts.dry_run && !opts.events_only {
        let spoke = ctx.b24.stats.answered.load(Relaxed) > answered;
        result = heartbeat(ctx, spoke).await;
    }
    s.progress = None;
    let after = counters();
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    s.bitrix24_requests = d[0];
    s.rate_limited = d[1];
    s.operation_limited = d[2];
    s.refreshes = d[3];
    s.limiter_wait_ms = d[4];
    s.unitalk_requests = d[5];
    s.unitalk_units = d[6];
    s.faults_survived += d[7];
    s.elapsed_ms = started.elapsed().as_millis() as u64;
    (s, result)
}

async fn pass(ctx: &SyncCtx, opts: &PassOptions, s: &mut PassSummary) -> Result<(), SyncError> {
    let cfg = &ctx.cfg;
    check_identity(ctx)?;
    events::process_unitalk(ctx, s)?;
    if !opts.dry_run && !opts.events_only {
        clicks::poll_offline(ctx).await?;
    }
    clicks::process_bitrix24(ctx, s)?;
    let uninstalled = ctx.store.lock().fact(clicks::FACT_UNINSTALLED)?;
    if let Some(at) = uninstalled {
        return Err(SyncError::Uninstalled { at });
    }
    if !opts.dry_run {
        clicks::advance(ctx, s).await?;
    }
    if opts.events_only {
        return push_due(ctx, opts, s).await;
    }
    refresh_lines(ctx, s).await?;
    let now = trusted_now(ctx);
    if !opts.dry_run {
        alert_lines(ctx, s).await?;
    }
    // (A dry run decides on its in-memory copy too: it says which calls it would look up.)
    verify_policy(ctx, now)?;
    let mut stored = ctx.store.lock().cursor(&opts.stream)?;
    if let Some(c) = stored.filter(|c| *c > now + Duration::minutes(CLOCK_TOLERANCE_MINUTES)) {
        // A cursor in the future: an earlier pass ran with a clock ahead. Everything since then
        // may be unread; rewind by the cursor's lead (at least a day), never before sync.start.
        let lead = c - now;
        let mut back = now - lead.max(Duration::days(1));
        if let Some(start) = cfg.sync.start.filter(|_| opts.range.is_none()) {
            back = back.max(start);
        }
        tracing::warn!(cursor = %c, now = %now, rewound_to = %back, "the cursor is in the future (the clock was ahead when it was set); rewinding it");
        ctx.store
            .lock()
            .set_cursor(&opts.stream, back, ctx.clock.now())?;
        stored = Some(back);
        s.cursor_rewound = true;
    }
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
        let records = events::sift_twins(ctx, &records, "poll")?;
        let hold = observe(ctx, &records, (w.start, w.end), s)?;
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
        s.windows_total = total;
        s.tell_progress();
    }
    if opts.range.is_none() {
        followup::recheck_recordings(ctx, s).await?;
        followup::sweep_long_calls(ctx, cursor, s).await?;
    }
    push_due(ctx, opts, s).await?;
    if !opts.dry_run {
        // Recordings sent in finish are proven now (or once `record_check_after` has passed);
        // the ones Bitrix24 does not show go again, by attachRecord, in this pass (those of a
        // check made during the push, while the portal was being learnt, too).
        let resent = record_check::check_finish_records(ctx, s).await?;
        if resent > 0 || s.records_resent > 0 {
            push_due(ctx, opts, s).await?;
        }
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
    let call = parse(ctx, &serde_json::from_str(raw).unwrap_or(Value::Null)).ok()?;
    match classify(&call, known, &ctx.cfg.sync, &ctx.cfg.rules) {
        Disposition::Push(f) => Some(*f),
        _ => None,
    }
}

/// Push rounds a pass makes while batches fail (each round probes what the last one left in
/// flight, then sends what is due).
const PUSH_ROUNDS: usize = 4;

/// Pushes every call with work due, in rounds while batches fail and the pass survives them.
async fn push_due(ctx: &SyncCtx, opts: &PassOptions, s: &mut PassSummary) -> Result<(), SyncError> {
    for _ in 0..PUSH_ROUNDS {
        let faults = s.faults_survived;
        match push_round(ctx, opts, s).await {
            // 429: certainly not executed. A portal that bills whole batches to `batch` takes
            // nothing more until the reset; the calls wait, in flight ones are probed later.
            Err(SyncError::Bitrix24(Bitrix24Error::OperationLimit { method, reset_at })) => {
                let until = reset_at
                    .and_then(|t| DateTime::from_timestamp(t, 0))
                    .unwrap_or(ctx.clock.now());
                note_paused(s, &method, until);
                break;
            }
            r => r?,
        }
        if s.faults_survived == faults || opts.dry_run {
            break;
        }
    }
    Ok(())
}

/// One push round: probes, main chains, then missed-call tasks.
async fn push_round(
    ctx: &SyncCtx,
    opts: &PassOptions,
    s: &mut PassSummary,
) -> Result<(), SyncError> {
    if opts.dry_run {
        dry_run_lookups(ctx, s)?;
    }
    // Lookups only read: a dry run makes them too, and applies their answers to its in-memory
    // copy of the state, so its plan is what a real pass would send after them.
    {
        // (The fact is read in its own statement: an `if let` would hold the store's lock.)
        let verify_before = ctx.store.lock().fact(FACT_VERIFY_BEFORE)?;
        if let Some(before) = verify_before.as_deref().and_then(crate::store::parse_ts) {
            verify_by_listing(ctx, before, s).await?;
            let marked = ctx.store.lock().mark_unverified(before, ctx.clock.now())?;
            if marked > 0 {
                tracing::info!(calls = marked, "looking up calls in Bitrix24 before registering them (the state file started empty)");
                s.verified += marked as u64;
            }
        }
        probe_in_flight(ctx, s).await?;
        // Outgoing calls that came of a click take its CALL_ID before anything is planned.
        clicks::claim(ctx, s)?;
    }
    settle_finished(ctx)?;
    // A call still in flight (its probe got no answer) is never planned again: it waits for a
    // probe that proves what Bitrix24 holds.
    let items: Vec<WorkItem> = ctx
        .store
        .lock()
        .work_due(ctx.clock.now())?
        .into_iter()
        .filter(|w| w.ledger.stage != Stage::InFlight)
        .collect();
    if items.is_empty() {
        return client_tasks::close_reached(ctx, opts, s).await;
    }
    let due = understand(ctx, items, s, opts.dry_run)?;
    let lines: HashSet<String> = due
        .iter()
        .filter_map(|d| d.facts.operator_line.clone())
        .collect();
    let (users, unresolved) = resolve_operators(ctx, &lines).await?;
    let mut due = due;
    if !unresolved.is_empty() {
        // Pushed now, these calls would go to the default user; they wait for an answer.
        let before = due.len();
        due.retain(|d| {
            d.facts
                .operator_line
                .as_ref()
                .is_none_or(|l| !unresolved.contains(l))
        });
        tracing::warn!(lines = ?unresolved, calls = before - due.len(), "Bitrix24 did not answer the user lookup for these inner lines; their calls wait");
        s.faults_survived += 1;
    }
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
    let tz = ctx.cfg.bitrix24.timezone;
    v.into_iter()
        .map(|f| match ctx.cfg.rules.skip_task(f) {
            Some(rule) => format!("call {}: no task (rule \"{rule}\", rules.skip_task)", f.id),
            None => format!(
                "call {}: tasks.task.add (\"{}\", deadline {}, responsible resolved once the call is in Bitrix24)",
                f.id,
                ctx.cfg.tasks.title.render(&crate::rules::values(f, tz, None, None)),
                crate::timezone::rfc3339_in(plan::task_deadline(&ctx.cfg, f), tz)
            ),
        })
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
