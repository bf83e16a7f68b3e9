//! Pull: everything read from Unitalk is staged in the store (calls, observations, quarantine).
//! Nothing here talks to Bitrix24. Operators and inner-line statuses are refreshed, a window is
//! pulled with a fixed `dateTo` (paged, deduped by id, re-paged if the total moved) and its
//! records observed (the later fetch wins; unreadable records are quarantined).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

use super::call::content_hash;
use super::{window, PassSummary, SyncCtx, SyncError, DIALING_HOLD_HOURS};
use crate::store::ledger::{NewQuarantine, Observation, Observed};
use crate::timezone::local_to_utc;
use crate::unitalk::{CallState, UnitalkError};

/// Refreshes operators (`/users/list`) and inner-line statuses (`/phones/inner`). Only a refused
/// key stops the pass: `/phones/inner` is unconfirmed and may not exist on every account.
pub async fn refresh_lines(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    match ctx.unitalk.users().await {
        Ok(users) => {
            let ops: Vec<_> = users
                .into_iter()
                .map(|u| (u.line, u.first_name, u.last_name))
                .collect();
            ctx.store.lock().upsert_operators(&ops)?;
        }
        Err(e @ UnitalkError::Auth { .. }) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list Unitalk users; using the operators already known")
        }
    }
    match ctx.unitalk.inner_lines().await {
        Ok(lines) => {
            let fetched = ctx.clock.now();
            let tz = ctx.cfg.unitalk.timezone;
            s.lines = lines.len() as u64;
            let store = ctx.store.lock();
            for l in lines {
                let observed = l.changed_at.map(|t| local_to_utc(t, tz)).unwrap_or(fetched);
                store.observe_line_status(
                    &l.line,
                    &l.status,
                    observed,
                    Some(&l.raw.to_string()),
                )?;
            }
        }
        // `/phones/inner` is unconfirmed: no answer from it, not even one that looks like an
        // auth error (the key works for history), stops call sync.
        Err(e) => {
            tracing::warn!(error = %e, "cannot read inner-line statuses (/phones/inner); call sync continues")
        }
    }
    Ok(())
}

/// Calls Unitalk, retrying what may succeed later (transport errors, 5xx, `"status":"Error"`
/// "Internal error") with growing delays; a refused key or cancellation stops at once.
pub(super) async fn unitalk_retry<T, F, Fut>(ctx: &SyncCtx, mut call: F) -> Result<T, SyncError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, UnitalkError>>,
{
    let mut attempt = 0u32;
    loop {
        let result = tokio::select! {
            r = call() => r,
            _ = ctx.cancel.cancelled() => return Err(SyncError::Cancelled),
        };
        match result {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && attempt < 4 => {
                let base = ctx.cfg.unitalk.retry_base_delay * (1u32 << attempt);
                let delay = base + base.mul_f64(rand::random::<f64>() * 0.5);
                tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "Unitalk request failed; retrying");
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

/// Most pages one window may take before it is split (bounds memory and a server that never
/// stops answering).
const MAX_PAGES_PER_WINDOW: u64 = 50;
/// A window shorter than this is not split further: its inconsistency is reported instead.
const MIN_SPLIT_SECONDS: i64 = 60;

/// How paging one window ended.
enum Paged {
    /// The answers prove every record of the window was read.
    Complete,
    /// They do not (a repeated page, too many pages, a count never reached): split the window.
    Inconsistent(String),
}

/// Pulls one window (fixed `dateTo`, paged newest first, deduped by id). Paging trusts neither
/// `count` nor a short page (a server may cap pages below `limit`, or lie about the total): a
/// window is complete only when the answers prove it, that is when a page comes back empty, or
/// when a page repeats with nothing new (a server that ignores `offset`) and `count` says every
/// record was read. Any other repeat, or more pages than the bound (a total that keeps
/// growing), makes the window inconsistent: it is split in halves and each is pulled again; a
/// window too short to split is an error, so the cursor never moves past unread records. The
/// price of certainty is one request per window that returns nothing.
pub(super) async fn pull_window(
    ctx: &SyncCtx,
    w: window::SyncWindow,
) -> Result<Vec<Value>, SyncError> {
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    let mut without_id: Vec<Value> = Vec::new();
    let mut stack = vec![w];
    while let Some(w) = stack.pop() {
        if ctx.cancel.is_cancelled() {
            return Err(SyncError::Cancelled);
        }
        match page_window(ctx, w, &mut by_id, &mut without_id).await? {
            Paged::Complete => {}
            Paged::Inconsistent(why) if (w.end - w.start).num_seconds() >= 2 * MIN_SPLIT_SECONDS => {
                tracing::warn!(start = %w.start, end = %w.end, %why, "Unitalk's paging of this window is inconsistent; splitting it");
                let mid = w.start + (w.end - w.start) / 2;
                stack.push(window::SyncWindow { start: mid, end: w.end });
                stack.push(window::SyncWindow { start: w.start, end: mid });
            }
            Paged::Inconsistent(why) => {
                return Err(SyncError::Unitalk(UnitalkError::Unavailable {
                    detail: format!(
                        "/history/get cannot be read completely for {} .. {}: {why}; the cursor stays before it",
                        w.start.to_rfc3339(),
                        w.end.to_rfc3339()
                    ),
                }))
            }
        }
    }
    Ok(by_id.into_values().chain(without_id).collect())
}

/// Pages one window into `by_id`/`without_id` and says whether the answers prove completeness.
/// Re-pages (up to three times) when the total moved while paging.
async fn page_window(
    ctx: &SyncCtx,
    w: window::SyncWindow,
    by_id: &mut BTreeMap<String, Value>,
    without_id: &mut Vec<Value>,
) -> Result<Paged, SyncError> {
    let (lo, hi) = window::wall_range(w, ctx.cfg.unitalk.timezone);
    let (from, to) = (window::unitalk_date(lo), window::unitalk_date(hi));
    let limit = u64::from(ctx.cfg.unitalk.page_size);
    let id_field = &ctx.cfg.unitalk.call_id_field;
    let mut verdict = Paged::Complete;
    for attempt in 0..3 {
        let mut offset = 0u64;
        let mut first_count = None;
        let mut last_count = None;
        let mut pages = 0u64;
        let mut seen_here: std::collections::HashSet<String> = Default::default();
        verdict = loop {
            if pages >= MAX_PAGES_PER_WINDOW {
                break Paged::Inconsistent(format!("more than {MAX_PAGES_PER_WINDOW} pages"));
            }
            let page = unitalk_retry(ctx, || {
                ctx.unitalk.history_page(&from, &to, limit as u32, offset)
            })
            .await?;
            if let Some(w) = &page.warning {
                tracing::warn!(warning = %w, "Unitalk returned a warning");
            }
            pages += 1;
            if pages == 1 {
                first_count = page.count;
            }
            last_count = page.count;
            let n = page.calls.len() as u64;
            let mut fresh = 0u64;
            for c in page.calls {
                match crate::unitalk::wire::record_id(&c, id_field) {
                    Some(id) => {
                        if seen_here.insert(id.clone()) {
                            fresh += 1;
                        }
                        by_id.insert(id, c);
                    }
                    None if !without_id.contains(&c) => {
                        fresh += 1;
                        without_id.push(c)
                    }
                    None => {}
                }
            }
            if n == 0 {
                // An empty page: nothing lies beyond, whatever `count` claims.
                if let Some(c) = page.count.filter(|c| *c > seen_here.len() as u64) {
                    tracing::debug!(
                        count = c,
                        served = seen_here.len(),
                        "Unitalk's count exceeds what it serves"
                    );
                }
                break Paged::Complete;
            }
            if fresh == 0 {
                // The same records again: the server ignores `offset`. Complete only if its
                // count says these are all; otherwise more hide behind them (split the window).
                break if page.count.is_some_and(|c| seen_here.len() as u64 >= c) {
                    Paged::Complete
                } else {
                    Paged::Inconsistent(format!(
                        "page at offset {offset} repeats records already read (offset ignored?)"
                    ))
                };
            }
            offset += n;
        };
        if first_count == last_count {
            break;
        }
        tracing::info!(attempt, before = ?first_count, after = ?last_count, "calls arrived while paging; paging the window again");
    }
    Ok(verdict)
}

/// How far a record's start may lie outside the range it was asked for (Unitalk's dates are wall
/// times in `unitalk.timezone`; a day covers any offset and a call spanning midnight).
const PLAUSIBLE_SLACK_DAYS: i64 = 1;

/// The range of starts a record is plausible in: the range that was asked for, with
/// `PLAUSIBLE_SLACK_DAYS` either side. A record outside it carries a broken date.
pub(super) fn plausible_range(
    asked: (DateTime<Utc>, DateTime<Utc>),
) -> (DateTime<Utc>, DateTime<Utc>) {
    let slack = Duration::days(PLAUSIBLE_SLACK_DAYS);
    (asked.0 - slack, asked.1 + slack)
}

/// The range a record arriving by webhook is plausible in: no range was asked for, so the last
/// year up to now.
pub(super) fn pushed_range(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    (now - Duration::days(365), now)
}

/// Stores records asked for in `asked` (a window, or `pushed_range` for webhooks); unreadable
/// ones and ones whose start lies outside `plausible_range(asked)` go to quarantine. Returns the
/// start of the oldest recent call still `DIALING`, which holds the cursor back.
pub(super) fn observe(
    ctx: &SyncCtx,
    records: &[Value],
    asked: (DateTime<Utc>, DateTime<Utc>),
    s: &mut PassSummary,
) -> Result<Option<DateTime<Utc>>, SyncError> {
    let now = ctx.clock.now();
    let (lo, hi) = plausible_range(asked);
    let mut obs = Vec::new();
    let mut quarantine = Vec::new();
    let mut hold: Option<DateTime<Utc>> = None;
    for raw in records {
        match super::parse(ctx, raw) {
            Ok(c) if c.started_at < lo || c.started_at > hi => {
                let reason = format!(
                    "its start {} is outside [{}, {}] (the range asked for, a day either side): a broken date, not a call to push",
                    c.started_at.to_rfc3339(),
                    lo.to_rfc3339(),
                    hi.to_rfc3339()
                );
                tracing::warn!(%reason, id = %c.id, "quarantining a Unitalk record");
                quarantine.push(NewQuarantine {
                    source: "unitalk",
                    call_id: Some(c.id.clone()),
                    raw: raw.to_string(),
                    reason,
                });
            }
            Ok(c) => {
                if c.state == CallState::Dialing
                    && c.started_at > now - Duration::hours(DIALING_HOLD_HOURS)
                {
                    hold = Some(hold.map_or(c.started_at, |h| h.min(c.started_at)));
                }
                obs.push(Observation {
                    call_id: c.id.clone(),
                    started_at: c.started_at,
                    content_hash: content_hash(&c),
                    raw: raw.to_string(),
                })
            }
            Err(e) => {
                tracing::warn!(reason = %e.reason, id = ?e.id, "quarantining an unreadable Unitalk record");
                quarantine.push(NewQuarantine {
                    source: "unitalk",
                    call_id: e.id,
                    raw: raw.to_string(),
                    reason: e.reason,
                });
            }
        }
    }
    let mut store = ctx.store.lock();
    for r in store.observe(&obs, now)? {
        match r {
            Observed::New => s.new += 1,
            Observed::Changed => s.changed += 1,
            Observed::Unchanged | Observed::Stale => s.unchanged += 1,
        }
    }
    let before = store.quarantined()?.len();
    store.apply(&[], &quarantine, None, now)?;
    s.quarantined += (store.quarantined()?.len() - before) as u64;
    Ok(hold)
}

/// Unitalk's own count of the calls in `[from, to)`: one request (`limit` 1). Only for progress
/// (`count` may be wrong or missing; paging never trusts it).
pub async fn estimate_calls(ctx: &SyncCtx, from: DateTime<Utc>, to: DateTime<Utc>) -> Option<u64> {
    let w = window::SyncWindow {
        start: from,
        end: to,
    };
    let (lo, hi) = window::wall_range(w, ctx.cfg.unitalk.timezone);
    let (from, to) = (window::unitalk_date(lo), window::unitalk_date(hi));
    ctx.unitalk.history_page(&from, &to, 1, 0).await.ok()?.count
}
