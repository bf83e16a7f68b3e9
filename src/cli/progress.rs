//! Progress of a long pass in calls *done* (pushed, skipped or quarantined), reported after
//! every window read and every batch sent: a bar on a terminal (log lines printed above it),
//! plain lines every 10 s elsewhere (journald). The rate is calls done per second; the ETA is the
//! slower of that pace and the rate limit's (about three commands per call, 50 per request).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::{Progress, ProgressFn};

pub struct CallProgress {
    bar: Option<indicatif::ProgressBar>,
    latest: Arc<Mutex<Option<Progress>>>,
    /// The last plain line, and whether it was printed (the last one always is, at `finish`).
    last_plain: Arc<Mutex<(String, bool)>>,
    callback: ProgressFn,
}

impl CallProgress {
    /// `total`: calls in the range, if known; `done_before`: already read by an earlier run;
    /// `per_second`: Bitrix24 requests per second; `plain`: print plain lines when stderr is
    /// not a terminal (else nothing).
    pub fn start(
        label: &'static str,
        total: Option<u64>,
        done_before: u64,
        per_second: f64,
        plain: bool,
    ) -> CallProgress {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total.unwrap_or(0));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {pos}/{len} calls  {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_position(done_before);
            // The bar keeps moving while a window is read or a batch waits for the rate limit.
            b.enable_steady_tick(Duration::from_millis(250));
            crate::redact::set_progress_bar(Some(b.clone()));
            b
        });
        let latest: Arc<Mutex<Option<Progress>>> = Default::default();
        let started = Instant::now();
        let last_line = Mutex::new(Instant::now() - Duration::from_secs(3600));
        let last_plain: Arc<Mutex<(String, bool)>> = Default::default();
        let (b2, l2, lp) = (bar.clone(), latest.clone(), last_plain.clone());
        let print = move |p: &Progress| {
            *l2.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.clone());
            let elapsed = started.elapsed().as_secs_f64().max(0.001);
            let done = done_before + p.done;
            let rate = p.done as f64 / elapsed;
            // Without a count, estimate what is left from the calls read and the windows still
            // to read.
            let left_calls = match total {
                Some(t) => t.saturating_sub(done) as f64,
                None => {
                    let per_window = p.pulled as f64 / p.windows_done.max(1) as f64;
                    let unread = p.windows_total.saturating_sub(p.windows_done) as f64 * per_window;
                    unread + p.pulled.saturating_sub(p.done) as f64
                }
            };
            let by_limit = left_calls * 3.0 / (per_second * 50.0);
            let by_pace = if rate > 0.0 {
                left_calls / rate
            } else {
                by_limit
            };
            let eta = Duration::from_secs(by_limit.max(by_pace).round() as u64);
            let msg = format!(
                "{} read, {} pushed, {rate:.1} calls/s, ETA {}",
                done_before + p.pulled,
                p.pushed,
                humantime::format_duration(eta)
            );
            match &b2 {
                Some(b) => {
                    b.set_length(total.unwrap_or(0).max(done + left_calls as u64));
                    b.set_position(done);
                    b.set_message(msg);
                }
                None if plain => {
                    let of = total.map(|t| format!("/{t}")).unwrap_or_default();
                    let line = format!("{label}: {done}{of} calls done: {msg}");
                    let mut last = last_line.lock().unwrap_or_else(|e| e.into_inner());
                    let due = last.elapsed() >= Duration::from_secs(10);
                    if due {
                        *last = Instant::now();
                        crate::say!("{line}");
                    }
                    *lp.lock().unwrap_or_else(|e| e.into_inner()) = (line, due);
                }
                None => {}
            }
        };
        CallProgress {
            bar,
            latest,
            last_plain,
            callback: ProgressFn(Arc::new(print)),
        }
    }

    pub fn callback(&self) -> ProgressFn {
        self.callback.clone()
    }

    /// Where the pass stood at its last report.
    pub fn latest(&self) -> Option<Progress> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Clears the bar (log lines go straight to stderr again); without one, prints where the
    /// pass ended if the last line was not printed yet.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            crate::redact::set_progress_bar(None);
            b.finish_and_clear();
        }
        let last = self.last_plain.lock().unwrap_or_else(|e| e.into_inner());
        if !last.1 && !last.0.is_empty() {
            crate::say!("{}", last.0);
        }
    }
}
