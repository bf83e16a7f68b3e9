//! What a pass reports: progress after each window and the summary line stored in the run log.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a pass stands, reported after each window.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub windows_done: u64,
    pub windows_total: u64,
    pub pulled: u64,
    pub pushed: u64,
    pub tasks: u64,
    /// Calls done so far: pushed, skipped or quarantined (what a progress bar counts).
    pub done: u64,
    /// The cursor after the last window read.
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

/// A callback is no part of what a pass did: two summaries are equal whatever they report to.
impl PartialEq for ProgressFn {
    fn eq(&self, _: &Self) -> bool {
        true
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
    /// Recordings that could not be downloaded for upload (tried again later).
    pub recording_downloads_failed: u64,
    /// Recordings sent in `finish` that the call statistics proved attached.
    pub records_proven: u64,
    /// Recordings sent in `finish` that the statistics did not show: sent again with
    /// attachRecord.
    pub records_resent: u64,
    /// Windows re-pulled by the long-call sweep.
    pub swept_windows: u64,
    /// The cursor was found in the future (a clock that had jumped ahead) and rewound.
    pub cursor_rewound: bool,
    /// Calls looked up in Bitrix24 before their first registration (verify-first).
    pub verified: u64,
    /// Click-to-call and callback requests received.
    pub clicks: u64,
    /// Clicks Unitalk was asked to ring.
    pub clicks_dialed: u64,
    /// Clicks whose Unitalk call was found (finished under the click's CALL_ID).
    pub clicks_claimed: u64,
    /// Clicks finished as cancelled (no line, refused, or no call within the TTL).
    pub clicks_cancelled: u64,
    /// New calls Unitalk webhooks brought (before the poller saw them).
    pub from_webhooks: u64,
    /// Calls that reached Bitrix24 in this pass.
    pub pushed: u64,
    /// Recordings proven attached in this pass: by `attachRecord`'s answer, or (sent in
    /// `finish`) by the call statistics.
    pub recordings: u64,
    /// Recording links sent in `finish` in this pass: unproven until a check finds the file
    /// (counted in `recordings` then, or sent again).
    pub recordings_in_finish: u64,
    pub tasks: u64,
    /// Missed calls folded into their client's open task (`tasks.one_per_client`).
    pub tasks_folded: u64,
    /// Client tasks completed by a call-back (`tasks.close_on_callback`).
    pub tasks_closed: u64,
    /// Missed-call notifications sent (`rules.notify`).
    pub notifications: u64,
    pub leads: u64,
    pub skipped: u64,
    pub quarantined: u64,
    /// Calls whose unknown outcome was settled by asking Bitrix24.
    pub probed: u64,
    /// Failed Bitrix24 requests the pass survived (probing what may have run, then going on).
    pub faults_survived: u64,
    /// Failed batch requests since the last one that answered (not stored).
    #[serde(skip)]
    pub failure_streak: u32,
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
    /// Where progress goes while the pass runs (not stored).
    #[serde(skip)]
    pub progress: Option<ProgressFn>,
    /// Calls whose main record reached Bitrix24 so far, counted batch by batch for progress
    /// (`pushed` is settled per push; not stored).
    #[serde(skip)]
    pub pushed_so_far: u64,
    /// Windows the pass plans to read (not stored).
    #[serde(skip)]
    pub windows_total: u64,
}

impl PassSummary {
    /// Calls done: pushed, skipped or quarantined.
    pub fn done(&self) -> u64 {
        self.pushed.max(self.pushed_so_far) + self.skipped + self.quarantined
    }

    /// Reports where the pass stands to its progress callback, if it has one.
    pub fn tell_progress(&self) {
        if let Some(p) = &self.progress {
            (p.0)(&Progress {
                windows_done: self.windows,
                windows_total: self.windows_total,
                pulled: self.pulled,
                pushed: self.pushed.max(self.pushed_so_far),
                tasks: self.tasks,
                done: self.done(),
                position: self
                    .cursor
                    .as_deref()
                    .and_then(|c| DateTime::parse_from_rfc3339(c).ok())
                    .map(|c| c.with_timezone(&Utc)),
            });
        }
    }
}

/// `1 call`, `2 calls`.
fn plural(n: u64, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

impl fmt::Display for PassSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pulled {} ({} new, {} changed, {} unchanged) in {}; pushed {}, recordings {}, tasks {}, leads {}, skipped {}, quarantined {}; {} Bitrix24 requests, {} Unitalk requests ({} units); {:.1}s",
            plural(self.pulled, "call"),
            self.new,
            self.changed,
            self.unchanged,
            plural(self.windows, "window"),
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
        if self.recording_downloads_failed > 0 {
            write!(
                f,
                "; {} recording downloads failed (retried later)",
                self.recording_downloads_failed
            )?;
        }
        if self.recording_rechecks + self.swept_windows + self.recordings_given_up > 0 {
            write!(
                f,
                "; follow-ups: {} recording re-checks, {} long-call sweep windows, {} recordings given up",
                self.recording_rechecks, self.swept_windows, self.recordings_given_up
            )?;
        }
        if self.recordings_in_finish + self.records_proven + self.records_resent > 0 {
            write!(
                f,
                "; recording links sent in finish: {}, proven attached: {}, not there (sent again): {}",
                self.recordings_in_finish, self.records_proven, self.records_resent
            )?;
        }
        if self.clicks + self.clicks_dialed + self.clicks_claimed + self.clicks_cancelled > 0 {
            write!(
                f,
                "; click-to-call: {} requests, {} rung, {} matched, {} cancelled",
                self.clicks, self.clicks_dialed, self.clicks_claimed, self.clicks_cancelled
            )?;
        }
        if self.notifications > 0 {
            write!(f, "; {} missed-call notifications", self.notifications)?;
        }
        if self.tasks_folded + self.tasks_closed > 0 {
            write!(
                f,
                "; client tasks: {} calls added to an open task, {} completed by a call-back",
                self.tasks_folded, self.tasks_closed
            )?;
        }
        if self.faults_survived > 0 {
            write!(
                f,
                "; survived {} failed Bitrix24 requests ({} calls probed)",
                self.faults_survived, self.probed
            )?;
        }
        if !self.paused.is_empty() {
            write!(f, "; paused by Bitrix24: {}", self.paused.join(", "))?;
        }
        Ok(())
    }
}
