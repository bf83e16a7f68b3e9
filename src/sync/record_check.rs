//! Proving recordings sent in `finish`'s `RECORD_URL`.
//!
//! With `sync.record_url_on_finish` (the default), a link known when a call is finished goes in
//! `finish` itself: two commands per call instead of three. Bitrix24 documents that parameter as
//! deprecated and reports no error when its download fails, so such a recording is unproven
//! (`record_check_at` in the ledger). `sync.record_check_after` later, the call statistics over
//! the calls' time ranges are read (50 calls a command, 50 pages a request) and a row's
//! `RECORD_FILE_ID` proves the file; a complete listing without it sends the link again with
//! `attachRecord`, which does report errors (the call goes back to `finished` without a
//! recording, and the ordinary push attaches it). An incomplete listing proves nothing either
//! way: the calls stay due.

use chrono::{DateTime, Duration, Utc};

use super::{reconcile, PassSummary, SyncCtx, SyncError};
use crate::config::Mode;

/// Calls closer than this are checked with one listing.
const MERGE_MINUTES: i64 = 15;
/// How much each range is widened on each side.
const PAD_SECONDS: i64 = 60;
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
/// back to `finished` for `attachRecord`.
pub(super) async fn check_finish_records(
    ctx: &SyncCtx,
    s: &mut PassSummary,
) -> Result<(), SyncError> {
    if ctx.cfg.bitrix24.mode != Mode::Telephony {
        return Ok(());
    }
    let now = ctx.clock.now();
    let due = ctx.store.lock().record_checks_due(now)?;
    if due.is_empty() {
        return Ok(());
    }
    let starts: Vec<DateTime<Utc>> = due.iter().map(|(_, t)| *t).collect();
    let mut proven = Vec::new();
    let mut unproven = Vec::new();
    for (from, to) in ranges(&starts).into_iter().take(MAX_RANGES) {
        let (listed, complete) = reconcile::listed_in_bitrix24(ctx, from, to).await?;
        for (id, _) in due.iter().filter(|(_, t)| *t >= from && *t < to) {
            let rows = listed.get(id).map(Vec::as_slice).unwrap_or_default();
            if rows.iter().any(|r| r.record_file) {
                proven.push(id.clone());
            } else if complete {
                unproven.push(id.clone());
            }
        }
    }
    if !unproven.is_empty() {
        tracing::warn!(
            calls = unproven.len(),
            "Bitrix24 holds no recording file for calls whose finish carried the link; sending the links again with attachRecord"
        );
    }
    s.records_proven += proven.len() as u64;
    s.records_resent += unproven.len() as u64;
    ctx.store
        .lock()
        .settle_record_checks(&proven, &unproven, ctx.clock.now())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn neighbours_merge_and_far_calls_get_their_own_range() {
        let t =
            |m: i64| Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap() + Duration::minutes(m);
        let r = ranges(&[t(0), t(10), t(20), t(120)]);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            (t(0) - Duration::seconds(60), t(20) + Duration::seconds(60))
        );
        assert_eq!(
            r[1],
            (
                t(120) - Duration::seconds(60),
                t(120) + Duration::seconds(60)
            )
        );
        assert!(ranges(&[]).is_empty());
    }
}
