//! `ubsync run`: the long-running alternative to the systemd timer.
//!
//! tokio-cron-scheduler is only the tick source: a one-second repeated job that tries to put a
//! tick into a channel of capacity one. A single worker takes ticks, asks the [`Schedule`] which
//! jobs are due (DST-correct, see `schedule.rs`) and runs them one after another through the same
//! pass functions `sync` and `reconcile` use, so runs never overlap and ticks that arrive during
//! a run coalesce into one. A failing job backs off with jitter; the others keep their times.
//! SIGTERM/SIGINT cancel the pass in flight at its next safe point and stop the ticks. With
//! `--listen`, `/healthz`, `/metrics` (Prometheus text) and the OAuth install callback are served.
//! Under systemd (`Type=notify`) it reports readiness and feeds the watchdog.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Duration, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::schedule::{JobKind, Schedule};
use crate::sync::{
    reconcile::reconcile, run_pass, PassOptions, PassSummary, SyncCtx, HISTORY_STREAM,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

/// The daemon's Prometheus metrics.
pub struct Metrics {
    registry: Registry,
    passes: Family<JobLabel, Counter>,
    failures: Family<JobLabel, Counter>,
    last_success: Family<JobLabel, Gauge>,
    pulled: Counter,
    pushed: Counter,
    quarantined: Counter,
    tasks: Counter,
    b24_requests: Counter,
    b24_503: Counter,
    b24_429: Counter,
    limiter_wait: Counter<f64, AtomicU64>,
    unitalk_units: Counter,
    cursor_lag: Gauge,
    /// Recordings sent in `finish` that the call statistics have not proven yet.
    recordings_unproven: Gauge,
    /// With webhooks on: calls by the path that saw them first (`webhook`, `poll`: the poller's
    /// are the ones webhooks missed or had not delivered yet).
    first_seen: Family<PathLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabel {
    path: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ubsync");
        let m = Metrics {
            passes: Family::default(),
            failures: Family::default(),
            last_success: Family::default(),
            pulled: Counter::default(),
            pushed: Counter::default(),
            quarantined: Counter::default(),
            tasks: Counter::default(),
            b24_requests: Counter::default(),
            b24_503: Counter::default(),
            b24_429: Counter::default(),
            limiter_wait: Counter::default(),
            unitalk_units: Counter::default(),
            cursor_lag: Gauge::default(),
            recordings_unproven: Gauge::default(),
            first_seen: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "calls_first_seen",
            "With webhooks on: calls by the path that delivered them first (webhook or poll)",
            m.first_seen.clone(),
        );
        for path in ["webhook", "poll"] {
            let _ = m.first_seen.get_or_create(&PathLabel { path: path.into() });
        }
        registry.register("passes", "Job runs, by job", m.passes.clone());
        registry.register("failures", "Failed job runs, by job", m.failures.clone());
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful run, by job",
            m.last_success.clone(),
        );
        registry.register(
            "calls_pulled",
            "Calls pulled from Unitalk",
            m.pulled.clone(),
        );
        registry.register(
            "calls_pushed",
            "Calls that reached Bitrix24",
            m.pushed.clone(),
        );
        registry.register(
            "calls_quarantined",
            "Calls quarantined",
            m.quarantined.clone(),
        );
        registry.register(
            "tasks_created",
            "Missed-call tasks created",
            m.tasks.clone(),
        );
        registry.register(
            "bitrix24_requests",
            "HTTP requests to Bitrix24",
            m.b24_requests.clone(),
        );
        registry.register(
            "bitrix24_rate_limited",
            "503 QUERY_LIMIT_EXCEEDED answers",
            m.b24_503.clone(),
        );
        registry.register(
            "bitrix24_operation_limited",
            "429 OPERATION_TIME_LIMIT answers",
            m.b24_429.clone(),
        );
        registry.register(
            "limiter_wait_seconds",
            "Time requests waited at the client-side rate limiter",
            m.limiter_wait.clone(),
        );
        registry.register(
            "unitalk_request_units",
            "Unitalk request units spent",
            m.unitalk_units.clone(),
        );
        registry.register(
            "cursor_lag_seconds",
            "How far the sync cursor is behind now",
            m.cursor_lag.clone(),
        );
        registry.register(
            "recordings_unproven",
            "Recordings sent in finish that the call statistics have not shown as files yet",
            m.recordings_unproven.clone(),
        );
        // Every series from the start, at zero: a dashboard or alert sees "none yet", not nothing.
        for job in [JobKind::Sync, JobKind::Lines, JobKind::Reconcile] {
            let label = JobLabel {
                job: job.as_str().into(),
            };
            let _ = m.passes.get_or_create(&label);
            let _ = m.failures.get_or_create(&label);
        }
        let build: Family<BuildLabel, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The running ubsync's version (always 1)",
            build,
        );
        Metrics { registry, ..m }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
}

impl Metrics {
    fn record(&self, job: JobKind, ok: bool, s: Option<&PassSummary>, now: DateTime<Utc>) {
        let label = JobLabel {
            job: job.as_str().into(),
        };
        self.passes.get_or_create(&label).inc();
        if ok {
            self.last_success.get_or_create(&label).set(now.timestamp());
        } else {
            self.failures.get_or_create(&label).inc();
        }
        if let Some(s) = s {
            self.pulled.inc_by(s.pulled);
            self.pushed.inc_by(s.pushed);
            self.quarantined.inc_by(s.quarantined);
            self.tasks.inc_by(s.tasks);
            self.b24_requests.inc_by(s.bitrix24_requests);
            self.b24_503.inc_by(s.rate_limited);
            self.b24_429.inc_by(s.operation_limited);
            self.limiter_wait.inc_by(s.limiter_wait_ms as f64 / 1000.0);
            self.unitalk_units.inc_by(s.unitalk_units);
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Shared between the worker and the HTTP endpoints.
struct Shared {
    ctx: SyncCtx,
    metrics: Metrics,
    started: DateTime<Utc>,
    last_error: Mutex<Option<String>>,
    /// Whether the first sync pass has been logged (at info, whatever it did).
    logged_first_pass: std::sync::atomic::AtomicBool,
}

async fn healthz(State(sh): State<Arc<Shared>>) -> Response {
    let now = sh.ctx.clock.now();
    let max_age = Duration::from_std(sh.ctx.cfg.health_max_age).unwrap_or(Duration::minutes(10));
    let last = sh.ctx.store.lock().last_ok_run("sync").ok().flatten();
    let last_error = sh
        .last_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match last {
        Some(t) if now - t <= max_age => (
            StatusCode::OK,
            format!(
                "ok: last successful sync {}s ago\n",
                (now - t).num_seconds()
            ),
        )
            .into_response(),
        None if now - sh.started <= max_age => {
            (StatusCode::OK, "ok: starting, no sync pass finished yet\n").into_response()
        }
        last => {
            let age = last
                .map(|t| {
                    format!(
                        "the last successful sync was {}s ago",
                        (now - t).num_seconds()
                    )
                })
                .unwrap_or_else(|| "no sync pass has succeeded".into());
            let why = last_error
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {age} (limit {}s){why}\n", max_age.num_seconds()),
            )
                .into_response()
        }
    }
}

async fn metrics(State(sh): State<Arc<Shared>>) -> Response {
    if let Ok(counts) = sh.ctx.store.lock().seen_counts() {
        for (path, n) in counts {
            sh.metrics
                .first_seen
                .get_or_create(&PathLabel { path })
                .set(n);
        }
    }
    if let Ok(n) = sh.ctx.store.lock().record_checks_pending() {
        sh.metrics.recordings_unproven.set(n);
    }
    if let Ok(Some(c)) = sh.ctx.store.lock().cursor(HISTORY_STREAM) {
        sh.metrics
            .cursor_lag
            .set((sh.ctx.clock.now() - c).num_seconds().max(0));
    }
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        sh.metrics.render(),
    )
        .into_response()
}

/// `GET /status`: the JSON of `ubsync status --json`.
async fn status(State(sh): State<Arc<Shared>>) -> Response {
    let v = {
        let store = sh.ctx.store.lock();
        crate::cli::inspect::status_json(&store, sh.ctx.clock.now())
    };
    match v {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the state store: {e}\n"),
        )
            .into_response(),
    }
}

/// A channel of one: a tick sent while one is already waiting is dropped (coalesced).
pub fn tick_channel() -> (mpsc::Sender<()>, mpsc::Receiver<()>) {
    mpsc::channel(1)
}

/// Runs the daemon until `ctx.cancel` fires. `listener`: where to serve the HTTP endpoints.
pub async fn run(
    ctx: SyncCtx,
    schedule: Schedule,
    listener: Option<TcpListener>,
    install_listener: Option<TcpListener>,
) -> anyhow::Result<()> {
    let cancel = ctx.cancel.clone();
    let shared = Arc::new(Shared {
        started: ctx.clock.now(),
        ctx,
        metrics: Metrics::default(),
        last_error: Mutex::new(None),
        logged_first_pass: Default::default(),
    });

    let (kick_tx, mut kick_rx) = mpsc::channel::<()>(1);
    if let Some(listener) = listener {
        let inbound = crate::inbound::Inbound {
            store: shared.ctx.store.clone(),
            clock: shared.ctx.clock.clone(),
            unitalk_secret: shared.ctx.cfg.webhooks.unitalk_secret.clone().map(Arc::new),
            b24_events: shared.ctx.cfg.webhooks.bitrix24_events,
            portal_key: shared
                .ctx
                .cfg
                .bitrix24
                .portal_url
                .as_ref()
                .map(crate::bitrix24::portal_key),
            app_token: shared
                .ctx
                .cfg
                .webhooks
                .application_token
                .clone()
                .map(Arc::new),
            kick: kick_tx.clone(),
        };
        let mut app = Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .route("/status", get(status))
            .with_state(shared.clone())
            .merge(crate::inbound::router(inbound));
        if shared.ctx.cfg.http.install {
            app = app.merge(crate::bitrix24::install::router(install_state(&shared)?));
        }
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
    }

    if let Some(listener) = install_listener {
        let app = crate::bitrix24::install::router(install_state(&shared)?);
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
    }

    let (tx, mut rx) = tick_channel();
    let scheduler = tokio_cron_scheduler::JobScheduler::new().await?;
    scheduler
        .add(tokio_cron_scheduler::Job::new_repeated_async(
            std::time::Duration::from_secs(1),
            move |_, _| {
                let tx = tx.clone();
                Box::pin(async move {
                    let _ = tx.try_send(());
                })
            },
        )?)
        .await?;
    scheduler.start().await?;

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval / 2) => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
                    _ = stop.cancelled() => break,
                }
            }
        });
    }
    tracing::info!(jobs = schedule.jobs.len(), timezone = %schedule.timezone, "ubsync daemon started");
    if shared.ctx.cfg.webhooks.bitrix24_events {
        match crate::sync::bind_events(&shared.ctx).await {
            Ok(added) if added.is_empty() => tracing::info!("Bitrix24 events already bound"),
            Ok(added) => tracing::info!(events = ?added, "bound Bitrix24 events"),
            Err(e) => {
                tracing::error!(error = %e, "could not bind the Bitrix24 events; click-to-call and callbacks will not arrive until this succeeds (it is tried at every start)")
            }
        }
    }

    let tz = schedule.timezone;
    let now = shared.ctx.clock.now();
    let mut next: Vec<Option<DateTime<Utc>>> = schedule
        .jobs
        .iter()
        .map(|j| j.next_after(now, tz))
        .collect();
    let mut failures = vec![0u32; schedule.jobs.len()];
    // The offline route polls for events every few seconds (each poll is one request).
    let mut last_offline_poll: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            t = rx.recv() => if t.is_none() { break },
            _ = kick_rx.recv() => {}
            _ = cancel.cancelled() => break,
        }
        if shared.ctx.cfg.webhooks.bitrix24_events
            && shared.ctx.cfg.webhooks.bitrix24_offline
            && last_offline_poll.is_none_or(|t| t.elapsed() >= OFFLINE_POLL)
        {
            last_offline_poll = Some(std::time::Instant::now());
            if let Err(e) = crate::sync::poll_offline(&shared.ctx).await {
                tracing::warn!(error = %e, "could not read Bitrix24's offline events; trying again");
            }
        }
        // Events first: a webhook's call reaches Bitrix24 within seconds, not at the next sync.
        if shared.ctx.store.lock().inbox_waiting().unwrap_or(0) > 0 {
            run_events(&shared).await;
        }
        let now = shared.ctx.clock.now();
        for (i, job) in schedule.jobs.iter().enumerate() {
            if cancel.is_cancelled() {
                break;
            }
            if next[i].is_none_or(|t| t > now) {
                continue;
            }
            let ok = run_job(&shared, job.kind, tz).await;
            let after = shared.ctx.clock.now();
            let due = job.next_after(after, tz);
            next[i] = if ok {
                failures[i] = 0;
                due
            } else {
                failures[i] += 1;
                // Back off with jitter (up to 30 minutes); the other jobs keep their times.
                let secs = (5u64 << failures[i].min(9)).min(1800);
                let backoff = after
                    + Duration::seconds((secs + rand::random::<u64>() % (secs / 2 + 1)) as i64);
                due.map(|d| d.max(backoff))
            };
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let mut scheduler = scheduler;
    let _ = scheduler.shutdown().await;
    tracing::info!("ubsync daemon stopped");
    Ok(())
}

/// How often the offline route asks `event.offline.get` (one request; at the standard plan's
/// 2 requests a second that is a tenth of the budget... of one second in ten).
const OFFLINE_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Processes the waiting events and pushes what they brought (no pull), in the run log as
/// `events`.
async fn run_events(sh: &Shared) {
    let ctx = &sh.ctx;
    let run_id = ctx.store.lock().begin_run("events", ctx.clock.now()).ok();
    let opts = PassOptions {
        events_only: true,
        ..PassOptions::default()
    };
    let r = run_pass(ctx, &opts).await;
    let now = ctx.clock.now();
    // Events runs come with every webhook: two days of them are kept, not the usual thirty.
    let _ = ctx
        .store
        .lock()
        .prune_runs_of("events", now - Duration::days(2));
    match &r {
        Ok(s) => {
            tracing::info!("events: {s}");
            if let Some(id) = run_id {
                let _ = ctx.store.lock().finish_run(
                    id,
                    now,
                    "ok",
                    serde_json::to_value(s).ok().as_ref(),
                    None,
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "processing events failed; the next sync pass takes them up");
            if let Some(id) = run_id {
                let _ = ctx
                    .store
                    .lock()
                    .finish_run(id, now, "failed", None, Some(&e.to_string()));
            }
        }
    }
}

async fn run_job(sh: &Shared, kind: JobKind, tz: chrono_tz::Tz) -> bool {
    let ctx = &sh.ctx;
    let started = ctx.clock.now();
    let result: Result<Option<PassSummary>, String> = match kind {
        JobKind::Sync => {
            let run_id = ctx.store.lock().begin_run("sync", started).ok();
            let r = run_pass(ctx, &PassOptions::default()).await;
            if let Some(id) = run_id {
                let now = ctx.clock.now();
                let _ = match &r {
                    Ok(s) => ctx.store.lock().finish_run(
                        id,
                        now,
                        "ok",
                        serde_json::to_value(s).ok().as_ref(),
                        None,
                    ),
                    Err(e) => {
                        ctx.store
                            .lock()
                            .finish_run(id, now, "failed", None, Some(&e.to_string()))
                    }
                };
            }
            r.map(|s| {
                // A pass that found nothing to do is not news (the daemon's first pass is: it
                // says the daemon works).
                let first = !sh
                    .logged_first_pass
                    .swap(true, std::sync::atomic::Ordering::Relaxed);
                if !first
                    && s.new + s.changed + s.pushed + s.tasks + s.quarantined + s.faults_survived
                        == 0
                {
                    tracing::debug!("sync: {s}");
                } else {
                    tracing::info!("sync: {s}");
                }
                Some(s)
            })
            .map_err(|e| e.to_string())
        }
        JobKind::Lines => {
            let mut s = PassSummary::default();
            let r = match crate::sync::refresh_lines(ctx, &mut s).await {
                Ok(()) => crate::sync::alert_lines(ctx, &mut s).await,
                Err(e) => Err(e),
            };
            r.map(|_| None).map_err(|e| e.to_string())
        }
        JobKind::Reconcile => {
            let day = (started.with_timezone(&tz) - Duration::days(1)).date_naive();
            let from =
                crate::timezone::local_to_utc(day.and_hms_opt(0, 0, 0).expect("midnight"), tz);
            let to = crate::timezone::local_to_utc(
                day.succ_opt()
                    .unwrap_or(day)
                    .and_hms_opt(0, 0, 0)
                    .expect("midnight"),
                tz,
            );
            let run_id = ctx.store.lock().begin_run("reconcile", started).ok();
            let result = reconcile(ctx, from, to, false).await;
            if let Some(id) = run_id {
                let now = ctx.clock.now();
                let _ = match &result {
                    Ok((_, summary)) => ctx.store.lock().finish_run(
                        id,
                        now,
                        "ok",
                        serde_json::to_value(summary).ok().as_ref(),
                        None,
                    ),
                    Err(e) => {
                        ctx.store
                            .lock()
                            .finish_run(id, now, "failed", None, Some(&e.to_string()))
                    }
                };
            }
            match result {
                Ok((report, summary)) => {
                    tracing::info!(
                        missing = report.missing_from_bitrix24.len(),
                        duplicated = report.duplicated_in_bitrix24.len(),
                        tasks_missing = report.tasks_missing.len(),
                        "reconcile of {day} done"
                    );
                    let _ = ctx.store.lock().prune_runs(started - Duration::days(30));
                    Ok(Some(summary))
                }
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let now = ctx.clock.now();
    match result {
        Ok(summary) => {
            sh.metrics.record(kind, true, summary.as_ref(), now);
            true
        }
        Err(e) => {
            tracing::warn!(job = kind.as_str(), error = %e, "job failed; it will back off and retry");
            *sh.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("{}: {e}", kind.as_str()));
            sh.metrics.record(kind, false, None, now);
            false
        }
    }
}

/// The install route's state; only telephony mode installs a local application.
fn install_state(shared: &Shared) -> anyhow::Result<crate::bitrix24::install::InstallState> {
    let cfg = &shared.ctx.cfg;
    if cfg.bitrix24.mode != crate::config::Mode::Telephony {
        anyhow::bail!(crate::config::ConfigError::Invalid {
            path: cfg.source.clone(),
            problems: vec![crate::config::KeyProblem {
                key: "http.install".into(),
                problem: "the install callback is only used in telephony mode".into(),
                fix: "remove http.install / --install-listen, or set bitrix24.mode = \"telephony\""
                    .into(),
            }],
        });
    }
    Ok(crate::bitrix24::install::InstallState::new(
        cfg,
        shared.ctx.store.clone(),
        shared.ctx.clock.clone(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_arriving_during_a_run_coalesce_into_one() {
        let (tx, mut rx) = tick_channel();
        // The worker is busy: the scheduler fires five times.
        let queued = (0..5).filter(|_| tx.try_send(()).is_ok()).count();
        assert_eq!(queued, 1, "only one tick waits");
        assert!(rx.try_recv().is_ok());
        assert!(
            rx.try_recv().is_err(),
            "the run that follows is the only one"
        );
    }
}
