//! Proving recordings sent in `finish`'s `RECORD_URL`.
//!
//! With `sync.record_url_on_finish` (the default), a link known when a call is finished goes in
//! `finish` itself: two commands per call instead of three. Bitrix24 documents that parameter as
//! deprecated and reports no error when its download fails, so such a recording is unproven
//! (`record_check_at` in the ledger). Right after the push (or `sync.record_check_after` later)
//! the call statistics over the calls' time ranges are read (50 calls a command, 50 pages a
//! request) and a row's `RECORD_FILE_ID` proves the file; a complete listing without it sends
//! the link again with `attachRecord`, which does report errors (the call goes back to
//! `finished` without a recording, and the pass pushes again). An incomplete listing proves
//! nothing either way: the calls stay due, for 30 minutes, and are then sent again unproven.
//! A check that finds none of three or more links downloaded turns finish's link off for this
//! portal (the fact `bitrix24.finish_record_url`).

use chrono::{DateTime, Duration, Utc};

use super::telephony::FACT_FINISH_TAKES_LINK;
use super::{reconcile, PassSummary, SyncCtx, SyncError};
use crate::config::Mode;

/// Calls closer than this are checked with one listing (the rows between them are mostly
/// ubsync's own calls, so one listing over them costs about what they need).
const MERGE_MINUTES: i64 = 24 * 60;
/// How much each range is widened on each side.
const PAD_SECONDS: i64 = 60;
/// How long a check may stay unproven for want of a readable listing before the recordings
/// are sent again anyway.
const GIVE_UP_MINUTES: i64 = 30;
/// A check must find at least this many links not downloaded (and none downloaded) before
/// finish's links are given up on this portal.
const MIN_TO_LEARN: usize = 3;
/// At most this many ranges are listed per pass (the rest wait for the next).
const MAX_RANGES: usize = 20;

/// Groups call starts (sorted) into padded ranges, neighbours closer than
/// [`MERGE_MINUTES`] merged.
pub fn ranges(starts: &[DateTime<Utc>]) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let pad = Duration::seconds(PAD_SECONDS);
    let mut out: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for &t in starts {
        match out.last_mut() {
            Some((_, to)) if t - pad <= *to + Duration::minutes(MERGE_MINUTES) => {
                *to = (*to).max(t + pad);
            }
            _ => out.push((t - pad, t + pad)),
        }
    }
    out
}

/// Reads the statistics for the recordings whose check is due and settles each: proven, or
/// back to `finished` for `attachRecord`. A check that proves none of them teaches ubsync that
/// this portal does not download `finish`'s link (the portal fact): later calls go with
/// attachRecord. Returns how many recordings are to be sent again.
pub(super) async fn check_finish_records(
    ctx: &SyncCtx,
    s: &mut PassSummary,
) -> Result<usize, SyncError> {
    if ctx.cfg.bitrix24.mode != Mode::Telephony {
        return Ok(0);
    }
    let now = ctx.clock.now();
    let due = ctx.store.lock().record_checks_due(now)?;
    if due.is_empty() {
        return Ok(0);
    }
    let starts: Vec<DateTime<Utc>> = due.iter().map(|c| c.started_at).collect();
    let mut proven = Vec::new();
    let mut unproven = Vec::new();
    // Due this long with no listing that proves anything: sent again all the same (attachRecord
    // replaces), so a portal whose statistics cannot be read never strands a recording.
    let mut overdue = Vec::new();
    let give_up = now - Duration::minutes(GIVE_UP_MINUTES);
    for (from, to) in ranges(&starts).into_iter().take(MAX_RANGES) {
        let (listed, complete) = reconcile::listed_in_bitrix24(ctx, from, to).await?;
        for c in due
            .iter()
            .filter(|c| c.started_at >= from && c.started_at < to)
        {
            let rows = listed
                .get(&c.call_id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if rows.iter().any(|r| r.record_file) {
                proven.push(c.call_id.clone());
            } else if complete {
                unproven.push(c.call_id.clone());
            } else if c.due_since < give_up {
                overdue.push(c.call_id.clone());
            }
        }
    }
    if !overdue.is_empty() {
        tracing::warn!(
            calls = overdue.len(),
            "the call statistics could not be read for {GIVE_UP_MINUTES} minutes: sending these recordings again with attachRecord unproven"
        );
    }
    if !unproven.is_empty() {
        tracing::warn!(
            calls = unproven.len(),
            "Bitrix24 holds no recording file for calls whose finish carried the link; sending the links again with attachRecord"
        );
    }
    let now = ctx.clock.now();
    // Statistics that cannot be read for long prove nothing either: attachRecord proves itself.
    unproven.extend(overdue);
    let learnt = match (proven.is_empty(), unproven.is_empty()) {
        (false, _) => Some("yes".to_string()),
        // One or two dead links are no lesson about the portal.
        (true, false) if unproven.len() >= MIN_TO_LEARN => {
            tracing::warn!("this portal downloaded none of the recording links sent in finish: from now on every recording goes by attachRecord (if it only downloads slowly, give it time with sync.record_check_after, e.g. \"10m\": a new value tries finish's link again)");
            Some(finish_refused(ctx))
        }
        _ => None,
    };
    s.records_proven += proven.len() as u64;
    s.recordings += proven.len() as u64;
    s.records_resent += unproven.len() as u64;
    let mut store = ctx.store.lock();
    store.settle_record_checks(&proven, &unproven, now)?;
    if let Some(v) = learnt {
        store.set_fact(FACT_FINISH_TAKES_LINK, &v, now)?;
    }
    Ok(unproven.len())
}

/// The fact's value when finish's links were not downloaded: `no:<record_check_after in
/// seconds>`, so a new `record_check_after` tries them again.
fn finish_refused(ctx: &SyncCtx) -> String {
    format!("no:{}", ctx.cfg.sync.record_check_after.as_secs())
}

/// Whether finish's links are worth sending, given the portal fact (see [`finish_refused`]).
pub(super) fn finish_takes_link(ctx: &SyncCtx, fact: Option<&str>) -> bool {
    fact != Some(finish_refused(ctx).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn neighbours_merge_and_far_calls_get_their_own_range() {
        let t =
            |m: i64| Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap() + Duration::minutes(m);
        let day = 24 * 60;
        let r = ranges(&[t(0), t(10), t(20), t(20 + day + 5)]);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            (t(0) - Duration::seconds(60), t(20) + Duration::seconds(60))
        );
        assert_eq!(
            r[1],
            (
                t(20 + day + 5) - Duration::seconds(60),
                t(20 + day + 5) + Duration::seconds(60)
            )
        );
        assert!(ranges(&[]).is_empty());
    }
}
