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

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Duration, Utc};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

mod metrics;

use metrics::Metrics;

use crate::schedule::{JobKind, Schedule};
use crate::sync::{reconcile::reconcile, PassOptions, PassSummary, SyncCtx};

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
    let last = sh.ctx.store.lock().last_healthy_sync().ok().flatten();
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
    sh.metrics.observe_store(&sh.ctx);
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
    let run_id = crate::sync::runlog::begin(ctx, "events");
    let opts = PassOptions {
        events_only: true,
        ..PassOptions::default()
    };
    let (summary, r) = crate::sync::run_pass_partial(ctx, &opts).await;
    crate::sync::runlog::finish_pass(ctx, run_id, &summary, &r);
    let now = ctx.clock.now();
    sh.metrics.record("events", r.is_ok(), Some(&summary), now);
    let r = r.map(|_| summary);
    // Events runs come with every webhook: two days of them are kept, not the usual thirty.
    let _ = ctx
        .store
        .lock()
        .prune_runs_of("events", now - Duration::days(2));
    match &r {
        Ok(s) => tracing::info!("events: {s}"),
        Err(e) => {
            tracing::warn!(error = %e, "processing events failed; the next sync pass takes them up")
        }
    }
}

async fn run_job(sh: &Shared, kind: JobKind, tz: chrono_tz::Tz) -> bool {
    let ctx = &sh.ctx;
    let started = ctx.clock.now();
    // What a failed pass did before it failed still counts in the metrics.
    let mut partial: Option<PassSummary> = None;
    let result: Result<Option<PassSummary>, String> = match kind {
        JobKind::Sync => {
            let run_id = crate::sync::runlog::begin(ctx, "sync");
            let opts = PassOptions {
                heartbeat: true,
                ..PassOptions::default()
            };
            let (summary, r) = crate::sync::run_pass_partial(ctx, &opts).await;
            crate::sync::runlog::finish_pass(ctx, run_id, &summary, &r);
            if r.is_err() {
                partial = Some(summary.clone());
            }
            let r = r.map(|_| summary);
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
            let run_id = crate::sync::runlog::begin(ctx, "reconcile");
            let result = reconcile(ctx, from, to, false).await;
            crate::sync::runlog::finish_reconcile(ctx, run_id, &result);
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
            sh.metrics
                .record(kind.as_str(), true, summary.as_ref(), now);
            true
        }
        Err(e) => {
            tracing::warn!(job = kind.as_str(), error = %e, "job failed; it will back off and retry");
            *sh.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(format!("{}: {e}", kind.as_str()));
            sh.metrics
                .record(kind.as_str(), false, partial.as_ref(), now);
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
