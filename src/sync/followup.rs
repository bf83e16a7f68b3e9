//! Follow-ups that do not depend on the pull window.
//!
//! - **Recordings.** Unitalk publishes a recording link minutes after a call (on backfills much
//!   later), often after the call's window has left the lookback. An answered call finished in
//!   Bitrix24 without a link is put on the recording watch for `sync.recording_wait`; each pass
//!   re-pulls the narrow time ranges of the awaited calls whose re-check is due (neighbours
//!   merged, at most `sync.recording_repulls` requests, re-checks spaced out exponentially up to
//!   an hour) and observes them, so a link that appeared turns the call's ledger row back to
//!   `finished` and the ordinary push attaches it. After the wait the call is given up, logged
//!   and counted.
//! - **Long calls.** Unitalk lists a call only once it ends, dated by its start; a call longer
//!   than `lookback + settle` starts before the cursor by the time it appears. Every
//!   `sync.sweep_every` (tracked in the store, so timer runs share it) the sweep re-pulls
//!   `[now − max_call_duration, cursor − lookback)`, so a call of any length up to
//!   `max_call_duration` lands within `settle + sweep_every` plus one pass of its end.
//!
//! Both only pull and observe; pushing stays with the ordinary ledger-driven push.

use chrono::{DateTime, Duration, Utc};

use super::pull::{observe, pull_window};
use super::{known_lines, secs, stored_facts, window, PassSummary, SyncCtx, SyncError};
use crate::store::followups::Watch;

/// The cursor stream that remembers when the long-call sweep last ran.
pub const SWEEP_STREAM: &str = "sweep:long-calls";
/// How much a re-checked call's range is widened on each side.
const RECHECK_PAD_SECONDS: i64 = 60;
/// Awaited calls closer than this are re-checked in one request.
const RECHECK_MERGE_MINUTES: i64 = 15;
/// The longest spacing between two re-checks of one call.
const RECHECK_MAX_MINUTES: i64 = 60;

/// The spacing before re-check number `checks + 1`: `sweep_every`, doubling, at most an hour.
pub fn recheck_interval(base: Duration, checks: u32) -> Duration {
    (base * 2i32.pow(checks.min(6))).min(Duration::minutes(RECHECK_MAX_MINUTES))
}

/// After a push: settles the watch (attached, given up) and puts newly finished calls on it:
/// answered ones without a link are awaited, the rest are noted as needing none (so each call
/// is judged once).
pub fn watch_new(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let wait = secs(ctx.cfg.sync.recording_wait);
    if wait.is_zero() {
        return Ok(());
    }
    settle(ctx, s)?;
    let now = ctx.clock.now();
    let candidates = ctx.store.lock().recording_candidates(now - wait)?;
    if candidates.is_empty() {
        return Ok(());
    }
    let known = known_lines(ctx)?;
    let rows: Vec<_> = candidates
        .into_iter()
        .map(|c| {
            let watch = match stored_facts(ctx, &known, &c.raw) {
                Some(f) if !f.missed && f.seconds_talk > 0 && f.link.is_none() => Watch::Awaiting,
                _ => Watch::NotExpected,
            };
            (c.call_id, c.started_at, watch, now + wait)
        })
        .collect();
    ctx.store.lock().watch_recordings(&rows, now)?;
    Ok(())
}

/// Marks awaited calls whose recording is now in Bitrix24 attached, and those past their wait
/// given up (logged and counted).
fn settle(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let given_up = ctx.store.lock().settle_recording_watch(ctx.clock.now())?;
    if !given_up.is_empty() {
        tracing::warn!(
            calls = given_up.len(),
            first = %given_up[0],
            wait = %humantime::format_duration(ctx.cfg.sync.recording_wait),
            "no recording link appeared within sync.recording_wait; giving up on these calls' recordings"
        );
        s.recordings_given_up += given_up.len() as u64;
    }
    Ok(())
}

/// Settles the watch and re-pulls the ranges of awaited calls whose re-check is due.
pub async fn recheck_recordings(ctx: &SyncCtx, s: &mut PassSummary) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    settle(ctx, s)?;
    let due = ctx.store.lock().recordings_due(now)?;
    if due.is_empty() {
        return Ok(());
    }
    let starts: Vec<DateTime<Utc>> = due.iter().map(|(_, t, _)| *t).collect();
    let ranges = window::merge_ranges(
        &starts,
        Duration::seconds(RECHECK_PAD_SECONDS),
        Duration::minutes(RECHECK_MERGE_MINUTES),
        secs(ctx.cfg.sync.max_window),
    );
    let base = secs(ctx.cfg.sync.sweep_every);
    for w in ranges
        .into_iter()
        .take(ctx.cfg.sync.recording_repulls as usize)
    {
        if ctx.cancel.is_cancelled() {
            return Err(SyncError::Cancelled);
        }
        let records = pull_window(ctx, w).await?;
        s.pulled += records.len() as u64;
        s.recording_rechecks += 1;
        let records = super::events::sift_twins(ctx, &records, "poll")?;
        observe(ctx, &records, (w.start, w.end), s)?;
        let checked: Vec<(String, DateTime<Utc>)> = due
            .iter()
            .filter(|(_, t, _)| *t >= w.start && *t < w.end)
            .map(|(id, _, checks)| (id.clone(), now + recheck_interval(base, *checks)))
            .collect();
        ctx.store.lock().recordings_checked(&checked, now)?;
    }
    Ok(())
}

/// Re-pulls `[now − max_call_duration, cursor − lookback)` when `sweep_every` has passed since
/// the last sweep (or the clock went back past it).
pub async fn sweep_long_calls(
    ctx: &SyncCtx,
    cursor: DateTime<Utc>,
    s: &mut PassSummary,
) -> Result<(), SyncError> {
    let now = ctx.clock.now();
    let every = secs(ctx.cfg.sync.sweep_every);
    let last = ctx.store.lock().cursor(SWEEP_STREAM)?;
    if last.is_some_and(|l| l <= now && now - l < every) {
        return Ok(());
    }
    let mut lo = now - secs(ctx.cfg.sync.max_call_duration);
    if let Some(start) = ctx.cfg.sync.start {
        lo = lo.max(start);
    }
    let hi = cursor - secs(ctx.cfg.sync.lookback);
    for w in window::plan_windows(
        lo,
        Duration::zero(),
        Duration::zero(),
        secs(ctx.cfg.sync.max_window),
        hi,
    ) {
        if ctx.cancel.is_cancelled() {
            return Err(SyncError::Cancelled);
        }
        let records = pull_window(ctx, w).await?;
        s.pulled += records.len() as u64;
        s.swept_windows += 1;
        let records = super::events::sift_twins(ctx, &records, "poll")?;
        observe(ctx, &records, (w.start, w.end), s)?;
    }
    ctx.store.lock().set_cursor(SWEEP_STREAM, now, now)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rechecks_space_out_to_an_hour() {
        let m = Duration::minutes;
        let got: Vec<i64> = (0..8)
            .map(|n| recheck_interval(m(5), n).num_minutes())
            .collect();
        assert_eq!(got, vec![5, 10, 20, 40, 60, 60, 60, 60]);
    }
}
