//! The Bitrix24 portal simulator.
//!
//! Follows `bitrix24-api.md`, section by section:
//! - §1.1 both URL forms: incoming webhooks `/rest/<user>/<code>/<method>` and OAuth
//!   `/rest/<method>` with `auth` in the query or body; an optional `.json` suffix; method names
//!   case-insensitive. §1.2 GET, form and JSON bodies.
//! - §1.3 the OAuth server at `/oauth/token/`: the refresh grant returns a *new* refresh token and
//!   invalidates the old one; access tokens expire (configurable) and then answer 401
//!   `expired_token`.
//! - §2.1 the leaky bucket per portal (capacity and drain configurable, default 50 and 2/s): once
//!   full, requests get HTTP 503 `QUERY_LIMIT_EXCEEDED` "Too many requests". A batch counts once.
//! - §2.2 the per-method operating budget over ten one-minute buckets: `time.operating` and
//!   `time.operating_reset_at` in every response; the call after the one that crosses the limit
//!   gets HTTP 429 `OPERATION_TIME_LIMIT`. A batch is billed as a whole to the method `batch`
//!   (as measured on real portals); `BatchBilling::PerMethod` bills nested commands to their own.
//! - §3 `batch`: at most 50 commands, `halt`, `$result[key][FIELD]` references, per-command
//!   `result_error`, PHP's JSON quirks (empty maps as `[]`, sequential numeric keys as a list).
//! - §4–§7 the methods themselves live in [`methods`].
//!
//! Fault injection ([`Fault`]) reproduces what real portals do under stress: HTML 5xx pages,
//! 503 storms, answers slower than the client's timeout, a connection dropped after the write was
//! committed, and forced `expired_token`.

pub mod events;
mod exec;
mod fields;
mod http;
mod methods;

use http::*;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Extension, Json, Router};
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use serde_json::{json, Map, Value};

pub use methods::{Activity, CrmEntity, ExtCall, PortalUser, StatRow, Task};

use super::scenario::{CrmKind, Scenario};
use super::ConnectionKill;
use crate::clock::Clock;
use crate::phpquery;

/// The local application's credentials the simulator accepts unless told otherwise.
pub const DEFAULT_CLIENT_ID: &str = "local.sim0000000000.00000000";
pub const DEFAULT_CLIENT_SECRET: &str = "sim-client-secret";
/// The incoming webhook the simulator accepts: `/rest/1/<code>/`.
pub const DEFAULT_WEBHOOK_CODE: &str = "simwebhookcode01";

/// How the simulated portal behaves.
#[derive(Debug, Clone)]
pub struct Bitrix24SimConfig {
    /// Leaky bucket capacity (X in §2.1).
    pub burst: f64,
    /// Leaky bucket drain per second (Y in §2.1).
    pub drain_per_sec: f64,
    /// Operating budget per method over 10 minutes, in seconds (§2.2).
    pub operating_limit: f64,
    /// Simulated execution time of one method call, in seconds.
    pub default_cost: f64,
    /// Per-method execution time overrides (lowercase method names).
    pub method_costs: HashMap<String, f64>,
    /// Access token lifetime.
    pub token_ttl: Duration,
    pub client_id: String,
    pub client_secret: String,
    /// Incoming webhooks: (user id, code).
    pub webhooks: Vec<(u64, String)>,
    /// The portal's time zone (dates in responses carry its offset).
    pub timezone: Tz,
    /// Whether `attachRecord` may run inside a batch (some portals refuse file methods there).
    pub attach_record_in_batch: bool,
    /// Whether a new `register` for an unknown number creates a lead when `CRM_CREATE=1`.
    pub lead_creation: bool,
    /// How a batch's execution time is billed (§2.2).
    pub batch_billing: BatchBilling,
    /// Whether `finish`'s deprecated `RECORD_URL` is downloaded into a file (`RECORD_FILE_ID`
    /// in the statistics). `false`: the URL is kept and nothing downloaded, with no error, as
    /// the docs allow.
    pub finish_record_downloads: bool,
    /// Whether `crm.activity.list` reads a `START_TIME` filter's value as UTC wall time,
    /// ignoring its offset (as some portals and fakes do): a listing by date then misses calls.
    pub activity_start_filter_ignores_offset: bool,
}

/// How a batch's execution time is billed against the operating budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchBilling {
    /// As measured on real portals: the whole batch is billed to the method `batch`, whose
    /// `time` carries `operating`; nested commands carry no budget of their own.
    #[default]
    Batch,
    /// Each nested command billed to its own method (`result_time[key].operating`).
    PerMethod,
}

impl Default for Bitrix24SimConfig {
    fn default() -> Self {
        Self {
            burst: 50.0,
            drain_per_sec: 2.0,
            operating_limit: 480.0,
            default_cost: 0.02,
            method_costs: HashMap::new(),
            token_ttl: Duration::hours(1),
            client_id: DEFAULT_CLIENT_ID.into(),
            client_secret: DEFAULT_CLIENT_SECRET.into(),
            webhooks: vec![(1, DEFAULT_WEBHOOK_CODE.into())],
            timezone: chrono_tz::Europe::Kyiv,
            attach_record_in_batch: true,
            lead_creation: true,
            batch_billing: BatchBilling::Batch,
            finish_record_downloads: true,
            activity_start_filter_ignores_offset: false,
        }
    }
}

/// What a fault does to the request it hits.
#[derive(Debug, Clone)]
pub enum FaultKind {
    /// HTTP `status` with an HTML page; nothing is executed.
    Html(u16),
    /// HTTP 503 `QUERY_LIMIT_EXCEEDED`; nothing is executed.
    QueryLimit,
    /// HTTP 429 `OPERATION_TIME_LIMIT`; nothing is executed.
    OperationLimit,
    /// Executes and commits, then answers only after this delay.
    Slow(std::time::Duration),
    /// Executes and commits, then drops the connection without answering.
    CommitThenDrop,
    /// Executes and commits, then answers HTTP `status` with `body` verbatim instead of the real
    /// answer (an HTML page, a truncated body, `{"result":[]}`, results without the command's
    /// key, a 4xx): an answer that proves nothing about what ran.
    CommitThenAnswer { status: u16, body: String },
    /// The OAuth access token used is expired (401 `expired_token`); nothing is executed.
    ExpiredToken,
}

/// A fault applied to the next `remaining` requests that match `method`.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Lowercase method name (`batch` or a method inside a batch); `None` matches any request.
    pub method: Option<String>,
    pub kind: FaultKind,
    pub remaining: u32,
}

impl Fault {
    pub fn once(method: Option<&str>, kind: FaultKind) -> Self {
        Self::times(method, kind, 1)
    }

    pub fn times(method: Option<&str>, kind: FaultKind, n: u32) -> Self {
        Self {
            method: method.map(str::to_lowercase),
            kind,
            remaining: n,
        }
    }
}

/// One HTTP request the portal received.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub at: DateTime<Utc>,
    /// Lowercase method (`batch` for batches).
    pub method: String,
    /// Methods of the commands inside a batch.
    pub commands: Vec<String>,
    pub status: u16,
    pub error: Option<String>,
    pub via_webhook: bool,
}

#[derive(Debug, Clone)]
struct AccessToken {
    user_id: u64,
    expires_at: DateTime<Utc>,
}

/// The credential a request runs under.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    Webhook { user_id: u64, code: String },
    App { user_id: u64 },
}

impl Caller {
    fn user_id(&self) -> u64 {
        match self {
            Caller::Webhook { user_id, .. } | Caller::App { user_id } => *user_id,
        }
    }

    fn budget_key(&self) -> String {
        match self {
            Caller::Webhook { code, .. } => format!("webhook:{code}"),
            Caller::App { .. } => "app".into(),
        }
    }

    fn is_app(&self) -> bool {
        matches!(self, Caller::App { .. })
    }
}

/// A method's failure, as the portal reports it.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: String,
    pub description: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, description: &str) -> Self {
        Self {
            status,
            code: code.into(),
            description: description.into(),
        }
    }

    fn body(&self) -> Value {
        json!({"error": self.code, "error_description": self.description})
    }
}

/// A method's success: its result, and `total`/`next` for list methods.
#[derive(Debug, Clone)]
pub(crate) struct ApiOk {
    pub result: Value,
    pub total: Option<u64>,
    pub next: Option<u64>,
}

impl ApiOk {
    pub fn new(result: Value) -> Self {
        Self {
            result,
            total: None,
            next: None,
        }
    }
}

pub(crate) type ApiResult = Result<ApiOk, ApiError>;

/// One method's operating time for one credential: one-minute buckets (opened at, seconds used).
type OperatingBuckets = Vec<(DateTime<Utc>, f64)>;

/// Everything the portal holds.
pub(crate) struct PortalState {
    pub cfg: Bitrix24SimConfig,
    pub base_url: String,
    /// Bound events: (EVENT, handler URL; empty for offline).
    pub events: Vec<(String, String)>,
    /// The offline-event queue: (id, event, data, reserved by process id).
    pub offline: Vec<(u64, String, Value, Option<String>)>,
    /// Whether `feature.get rest_offline_extended` says the reserve-then-clear mode exists.
    pub offline_extended: bool,
    pub data: methods::PortalData,
    access_tokens: HashMap<String, AccessToken>,
    refresh_tokens: HashMap<String, u64>,
    bucket_level: f64,
    bucket_at: Option<DateTime<Utc>>,
    operating: HashMap<(String, String), OperatingBuckets>,
    faults: Vec<Fault>,
    log: Vec<LoggedRequest>,
    token_seq: u64,
    pub member_id: String,
}

/// Handle to the simulated portal.
#[derive(Clone)]
pub struct Bitrix24Sim {
    state: Arc<Mutex<PortalState>>,
    clock: Clock,
}

impl Bitrix24Sim {
    pub fn new(cfg: Bitrix24SimConfig, clock: Clock) -> Self {
        let data = methods::PortalData::new(cfg.timezone);
        Self {
            state: Arc::new(Mutex::new(PortalState {
                cfg,
                base_url: "http://127.0.0.1".into(),
                events: Vec::new(),
                offline: Vec::new(),
                offline_extended: true,
                data,
                access_tokens: HashMap::new(),
                refresh_tokens: HashMap::new(),
                bucket_level: 0.0,
                bucket_at: None,
                operating: HashMap::new(),
                faults: Vec::new(),
                log: Vec::new(),
                token_seq: 0,
                member_id: "a223c6b3710f85df22e9377d6c4f7553".into(),
            })),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PortalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The address clients reach the portal on (used for `client_endpoint`).
    pub fn set_base_url(&self, url: &str) {
        self.lock().base_url = url.trim_end_matches('/').to_string();
    }

    /// Creates users (the admin and one per operator) and CRM clients from `scenario`.
    pub fn seed(&self, scenario: &Scenario) {
        let mut st = self.lock();
        let d = &mut st.data;
        d.add_user(PortalUser {
            id: scenario.admin_user_id,
            name: "Admin".into(),
            last_name: "Portal".into(),
            email: "admin@example.com".into(),
            inner: None,
            active: true,
        });
        for o in &scenario.operators {
            d.add_user(PortalUser {
                id: o.b24_user_id,
                name: o.first_name.clone(),
                last_name: o.last_name.clone(),
                email: o.email.clone(),
                inner: Some(o.inner_line.clone()),
                active: true,
            });
        }
        for c in &scenario.crm {
            d.add_entity(CrmEntity {
                kind: c.kind,
                id: c.id,
                title: c.name.clone(),
                phones: vec![c.phone.clone()],
                assigned_by_id: c.responsible_id,
                source: None,
            });
        }
    }

    /// Adds or replaces a portal user.
    pub fn add_user(&self, user: PortalUser) {
        self.lock().data.add_user(user);
    }

    /// Simulates installing the local application: mints and returns (access, refresh) tokens
    /// for `user_id`, as the install callback would deliver them.
    pub fn install_app(&self, user_id: u64) -> (String, String) {
        let now = self.clock.now();
        let mut st = self.lock();
        st.mint_tokens(user_id, now)
    }

    /// The form body a portal POSTs to a local application's installation path right after the
    /// admin adds it (`ONAPPINSTALL`), with fresh tokens for `user_id`.
    pub fn install_callback_body(&self, user_id: u64) -> String {
        phpquery::build(
            self.install_callback_fields(user_id)
                .as_object()
                .expect("object"),
        )
    }

    /// The fields of [`Bitrix24Sim::install_callback_body`], for tests that forge variants.
    pub fn install_callback_fields(&self, user_id: u64) -> Value {
        let (access, refresh) = self.install_app(user_id);
        let st = self.lock();
        let host = st
            .base_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_string();
        json!({
            "event": "ONAPPINSTALL",
            "data": {"VERSION": "1", "ACTIVE": "Y", "INSTALLED": "Y", "LANGUAGE_ID": "en"},
            "ts": st.token_seq.to_string(),
            "auth": {
                "access_token": access, "expires": "", "expires_in": st.cfg.token_ttl.num_seconds().to_string(),
                "scope": "crm,task,telephony,user_basic,im", "domain": host,
                "server_endpoint": format!("{}/rest/", st.base_url), "status": "L",
                "client_endpoint": format!("{}/rest/", st.base_url), "member_id": st.member_id,
                "user_id": user_id.to_string(), "refresh_token": refresh, "application_token": "sim-application-token",
            },
        })
    }

    /// Makes every access token issued so far expire now.
    pub fn expire_access_tokens(&self) {
        let now = self.clock.now();
        for t in self.lock().access_tokens.values_mut() {
            t.expires_at = now - Duration::seconds(1);
        }
    }

    /// Whether `refresh` is currently a valid refresh token.
    pub fn refresh_token_valid(&self, refresh: &str) -> bool {
        self.lock().refresh_tokens.contains_key(refresh)
    }

    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Drops every fault not yet used up.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Fills the leaky bucket to `level` (e.g. another app on the same IP used it).
    pub fn set_bucket_level(&self, level: f64) {
        let now = self.clock.now();
        let mut st = self.lock();
        st.bucket_level = level;
        st.bucket_at = Some(now);
    }

    /// Changes the portal's behaviour while running.
    pub fn configure(&self, f: impl FnOnce(&mut Bitrix24SimConfig)) {
        f(&mut self.lock().cfg);
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.lock().log.clone()
    }

    pub fn calls(&self) -> Vec<ExtCall> {
        self.lock().data.calls.clone()
    }

    pub fn stats(&self) -> Vec<StatRow> {
        self.lock().data.stats.clone()
    }

    pub fn activities(&self) -> Vec<Activity> {
        self.lock().data.activities.clone()
    }

    pub fn tasks(&self) -> Vec<Task> {
        self.lock().data.tasks.clone()
    }

    pub fn entities(&self) -> Vec<CrmEntity> {
        self.lock().data.entities.clone()
    }

    /// Leads created through the API (not seeded).
    pub fn created_leads(&self) -> Vec<CrmEntity> {
        self.lock()
            .data
            .entities
            .iter()
            .filter(|e| e.kind == CrmKind::Lead && e.source.is_some())
            .cloned()
            .collect()
    }

    /// Removes a call's statistics row and its activity, as if it never reached the portal (or an
    /// admin deleted it): for reconciliation tests.
    pub fn forget_call(&self, external_call_id: &str) {
        let mut st = self.lock();
        let gone: Vec<Option<u64>> = st
            .data
            .stats
            .iter()
            .filter(|r| r.external_call_id.as_deref() == Some(external_call_id))
            .map(|r| r.crm_activity_id)
            .collect();
        st.data
            .stats
            .retain(|r| r.external_call_id.as_deref() != Some(external_call_id));
        st.data.activities.retain(|a| !gone.contains(&Some(a.id)));
    }

    /// Adds a second statistics row for a call (a duplicate someone else created).
    pub fn duplicate_call(&self, external_call_id: &str) {
        let mut st = self.lock();
        if let Some(mut row) = st
            .data
            .stats
            .iter()
            .find(|r| r.external_call_id.as_deref() == Some(external_call_id))
            .cloned()
        {
            row.id = st.data.stats.len() as u64 + 1;
            st.data.stats.push(row);
        }
    }

    /// Deletes a task.
    pub fn forget_task(&self, id: u64) {
        self.lock().data.tasks.retain(|t| t.id != id);
    }

    pub fn notifications(&self) -> Vec<Value> {
        self.lock().data.notifications.clone()
    }

    /// The portal's *old* address after a move (§1.2): every REST request answers 302 with the
    /// same path at `new_base`. Serve it on a second port beside [`Bitrix24Sim::router`].
    pub fn moved_router(&self, new_base: &str) -> Router {
        let new_base = new_base.trim_end_matches('/').to_string();
        let sim = self.clone();
        Router::new().route(
            "/rest/{*path}",
            any(move |Path(path): Path<String>, RawQuery(query): RawQuery| {
                let location = format!(
                    "{new_base}/rest/{path}{}",
                    query.map(|q| format!("?{q}")).unwrap_or_default()
                );
                let now = sim.clock.now();
                sim.lock().log.push(LoggedRequest {
                    at: now,
                    method: normalize_method(path.rsplit('/').next().unwrap_or("")),
                    commands: Vec::new(),
                    status: 302,
                    error: Some("moved".into()),
                    via_webhook: path.matches('/').count() >= 2,
                });
                async move { (StatusCode::FOUND, [("location", location)], "").into_response() }
            }),
        )
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/rest/{*path}", any(rest))
            .route("/oauth/token", any(oauth_token))
            .route("/oauth/token/", any(oauth_token))
            .with_state(self.clone())
    }
}

/// Sorted, deduplicated list of what a batch's commands were, for logs and tests.
pub fn command_histogram(reqs: &[LoggedRequest]) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for r in reqs.iter().filter(|r| r.status == 200) {
        if r.method == "batch" {
            for c in &r.commands {
                *h.entry(c.clone()).or_default() += 1;
            }
        } else {
            *h.entry(r.method.clone()).or_default() += 1;
        }
    }
    h
}
