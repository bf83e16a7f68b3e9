//! The daemon's Prometheus metrics: counters fed by each job's summary, gauges read from the
//! store when `/metrics` is asked, every series present from the start.

use std::sync::atomic::AtomicU64;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::schedule::JobKind;
use crate::sync::{PassSummary, SyncCtx, HISTORY_STREAM};

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
        let jobs = [JobKind::Sync, JobKind::Lines, JobKind::Reconcile].map(JobKind::as_str);
        for job in jobs.into_iter().chain(["events"]) {
            let label = JobLabel { job: job.into() };
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
    /// Counts a run of `job` (`sync`, `lines`, `reconcile`, `events`) and what it did, also
    /// when it failed part way.
    pub(super) fn record(&self, job: &str, ok: bool, s: Option<&PassSummary>, now: DateTime<Utc>) {
        let label = JobLabel { job: job.into() };
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

    /// Sets the gauges read from the store (first-seen paths, unproven recordings, cursor lag).
    pub(super) fn observe_store(&self, ctx: &SyncCtx) {
        if let Ok(counts) = ctx.store.lock().seen_counts() {
            for (path, n) in counts {
                self.first_seen.get_or_create(&PathLabel { path }).set(n);
            }
        }
        if let Ok(n) = ctx.store.lock().record_checks_pending() {
            self.recordings_unproven.set(n);
        }
        if let Ok(Some(c)) = ctx.store.lock().cursor(HISTORY_STREAM) {
            self.cursor_lag
                .set((ctx.clock.now() - c).num_seconds().max(0));
        }
    }

    pub(super) fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
