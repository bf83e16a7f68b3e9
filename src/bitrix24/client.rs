//! The HTTP client for one portal.
//!
//! Every request (a batch is one) waits for the client-side limiter first; nothing reaches the
//! portal around it. Requests are JSON POSTs with automatic redirects disabled (a 302 means the
//! portal moved, §1.2). In OAuth mode the access token goes in the body, never the URL, and a 401
//! `expired_token`/`invalid_token` triggers one refresh, single-flight across concurrent
//! requests, whose new pair is stored before it is used. Errors never carry URLs (webhook codes
//! and tokens live there).

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use super::batch::{self, Command};
use super::limit::{BucketLevel, OperatingTracker, RequestBudget};
use super::redirect;
use super::wire::{self, BatchOutcome, Decoded, Envelope, ErrorBody};
use super::{auth_hint, Bitrix24Error};
use crate::clock::Clock;
use crate::config::{Bitrix24Config, Mode, WebhookUrl};

/// The configured REST base: the webhook URL, or the portal's `/rest/`.
fn configured_base(auth: &Auth) -> Url {
    match auth {
        Auth::Webhook(w) => w.expose(),
        Auth::OAuth { portal, .. } => portal.join("/rest/").expect("valid portal URL"),
    }
}
use crate::store::{OAuthTokens, SharedStore};

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub rate_limited: AtomicU64,
    pub operation_limited: AtomicU64,
    pub refreshes: AtomicU64,
    /// Failed requests asked again (refused before sending, or a read whose answer was lost).
    pub retried: AtomicU64,
    /// Requests the portal answered (with a result): proof that it is reachable and ours.
    pub answered: AtomicU64,
}

enum Auth {
    Webhook(WebhookUrl),
    OAuth {
        portal: Url,
        client_id: String,
        client_secret: SecretString,
        oauth_url: Url,
    },
}

/// A client for one Bitrix24 portal.
pub struct Bitrix24Client {
    http: reqwest::Client,
    auth: Auth,
    /// The gate every request passes.
    pub budget: RequestBudget,
    /// Per-method operating-time budgets.
    pub operating: OperatingTracker,
    /// The portal's bucket as counted here, kept in the state after every request.
    bucket: Mutex<Option<BucketLevel>>,
    per_second: f64,
    keeps_bucket: bool,
    store: SharedStore,
    clock: Clock,
    /// `bitrix24.request_timeout`, in seconds (for messages).
    timeout_secs: u64,
    /// Held while refreshing so concurrent 401s refresh once.
    refresh_lock: tokio::sync::Mutex<()>,
    /// The portal's new origin when it moved (a permanent redirect answered earlier to a
    /// request for the configured address). Only an origin: the path (and the webhook code in
    /// it) always comes from the configuration.
    moved: Mutex<Option<Url>>,
    /// Plain http allowed beyond loopback (`bitrix24.allow_insecure_http`).
    allow_http: bool,
    retry_base: Duration,
    /// How long 503s are waited out before a request gives up.
    rate_limit_patience: Duration,
    pub stats: Arc<ClientStats>,
}

/// Fact key of the origin a configured portal address moved to (value: `scheme://host[:port]`).
/// Keyed by the configured origin, so editing the config makes the remembered move irrelevant.
pub fn moved_fact_key(configured: &Url) -> String {
    format!("bitrix24.moved:{}", redirect::origin(configured))
}
/// How long 503s are retried before a request gives up (the pass then exits 75).
pub const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(300);

/// The store key of a portal's tokens.
pub fn portal_key(url: &Url) -> String {
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{}{port}", url.host_str().unwrap_or("portal"))
}

/// Batch-level error codes Bitrix24 answers before running any command (limits, auth, a batch
/// it refuses as a whole): proof that nothing was executed.
pub fn pre_execution(code: &str) -> bool {
    matches!(
        code,
        "QUERY_LIMIT_EXCEEDED"
            | "OPERATION_TIME_LIMIT"
            | "ERROR_BATCH_LENGTH_EXCEEDED"
            | "ERROR_BATCH_METHOD_NOT_ALLOWED"
            | "expired_token"
            | "invalid_token"
            | "NO_AUTH_FOUND"
            | "WRONG_AUTH_TYPE"
            | "insufficient_scope"
            | "invalid_scope"
            | "ACCESS_DENIED"
            | "PAYMENT_REQUIRED"
            | "INVALID_CREDENTIALS"
            | "user_access_error"
            | "OVERLOAD_LIMIT"
            | "PORTAL_DELETED"
            | "ERROR_METHOD_NOT_FOUND"
    )
}

/// A transport error, classified: DNS and TLS failures are configuration mistakes (nothing was
/// sent); a refused connection certainly did not execute; anything else may have.
fn transport_error(e: reqwest::Error, url: &Url, key: &str, timeout: u64) -> Bitrix24Error {
    let e = e.without_url();
    let failure = crate::netdiag::classify(&e);
    let what = crate::netdiag::explain(failure, &crate::netdiag::host_of(url), key, timeout);
    if failure.is_configuration() {
        return Bitrix24Error::Misconfigured {
            detail: what,
            outcome_unknown: false,
        };
    }
    Bitrix24Error::Unavailable {
        detail: format!("{what}: {e}"),
        outcome_unknown: failure != crate::netdiag::Failure::Refused && !e.is_connect(),
    }
}

/// Fact: the portal's bucket as this client left it (`BucketLevel`).
pub const FACT_BUCKET: &str = "bitrix24.bucket";

/// Fact: the methods Bitrix24 paused (429 `OPERATION_TIME_LIMIT`), as `{"method": unix end}`.
pub const FACT_OPERATING_PAUSES: &str = "bitrix24.operating_paused";

impl Bitrix24Client {
    pub fn new(
        cfg: &Bitrix24Config,
        store: SharedStore,
        clock: Clock,
    ) -> Result<Self, Bitrix24Error> {
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(std::time::Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ubsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Bitrix24Error::Unavailable {
                detail: format!("cannot build HTTP client: {}", e.without_url()),
                outcome_unknown: false,
            })?;
        let auth = match cfg.mode {
            Mode::Activity => Auth::Webhook(cfg.webhook_url.clone().expect("validated by config")),
            Mode::Telephony => Auth::OAuth {
                portal: cfg.portal_url.clone().expect("validated by config"),
                client_id: cfg.client_id.clone().expect("validated by config"),
                client_secret: cfg.client_secret.clone().expect("validated by config"),
                oauth_url: cfg.oauth_url.clone(),
            },
        };
        let moved = store
            .lock()
            .fact(&moved_fact_key(&configured_base(&auth)))
            .ok()
            .flatten()
            .and_then(|u| Url::parse(&u).ok());
        let budget = RequestBudget::new(
            cfg.burst,
            cfg.per_second,
            cfg.max_per_10s,
            cfg.retry_base_delay,
        );
        // What an earlier process left in the portal's bucket is still there.
        let left = store.lock().fact(FACT_BUCKET).ok().flatten();
        let left = left.as_deref().and_then(BucketLevel::decode);
        if let Some(left) = left {
            let level = left.drained_to(clock.now(), f64::from(cfg.per_second.get()));
            if level >= 1.0 {
                tracing::debug!(
                    level,
                    "the portal's bucket still holds an earlier process's requests"
                );
                budget.preload(level.ceil() as u32);
            }
        }
        let operating = OperatingTracker::new(cfg.operating_limit);
        let now = clock.now();
        let pauses = store.lock().fact(FACT_OPERATING_PAUSES).ok().flatten();
        for (method, until) in pauses
            .and_then(|p| serde_json::from_str::<HashMap<String, i64>>(&p).ok())
            .unwrap_or_default()
        {
            if let Some(until) = DateTime::from_timestamp(until, 0) {
                operating.restore(&method, until, now);
            }
        }
        Ok(Self {
            http,
            auth,
            budget,
            bucket: Mutex::new(left),
            per_second: f64::from(cfg.per_second.get()),
            keeps_bucket: true,
            operating,
            store,
            clock,
            timeout_secs: cfg.request_timeout.as_secs(),
            refresh_lock: tokio::sync::Mutex::new(()),
            moved: Mutex::new(moved),
            allow_http: cfg.allow_insecure_http,
            retry_base: cfg.retry_base_delay,
            rate_limit_patience: RATE_LIMIT_PATIENCE,
            stats: Arc::new(ClientStats::default()),
        })
    }

    /// A client that does not record the portal's bucket in the state (a dry run leaves the
    /// state file as it was; its few reads are counted by this process's limiter alone).
    pub fn without_keeping_the_bucket(mut self) -> Self {
        self.keeps_bucket = false;
        self
    }

    /// Counts one request in the portal's bucket as kept in the state (`FACT_BUCKET`), for the
    /// next process's limiter.
    fn keep_bucket(&self) {
        if !self.keeps_bucket {
            return;
        }
        let now = self.clock.now();
        let level = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let next = b
                .unwrap_or(BucketLevel {
                    level: 0.0,
                    at: now,
                })
                .after_request(now, self.per_second);
            *b = Some(next);
            next
        };
        if let Err(e) = self
            .store
            .lock()
            .set_fact(FACT_BUCKET, &level.encode(), now)
        {
            tracing::debug!(error = %e, "cannot keep the portal's bucket level in the state");
        }
    }

    /// Records the methods the portal paused (429 `OPERATION_TIME_LIMIT`) in the state, so the
    /// next process rests them too: a pass five minutes after a 429 sends nothing to a method
    /// still in its ten-minute window.
    fn keep_pauses(&self, now: DateTime<Utc>) {
        let pauses: HashMap<String, i64> = self
            .operating
            .paused(now)
            .into_iter()
            .map(|(m, t)| (m, t.timestamp()))
            .collect();
        let text = serde_json::to_string(&pauses).unwrap_or_default();
        if let Err(e) = self
            .store
            .lock()
            .set_fact(FACT_OPERATING_PAUSES, &text, now)
        {
            tracing::warn!(error = %e, "cannot record Bitrix24's pause in the state; a pass in another process may call the method before it resumes");
        }
    }

    /// Sets how long 503 `QUERY_LIMIT_EXCEEDED` is waited out (zero: report it at once, as
    /// `ubsync check` does).
    pub fn with_rate_limit_patience(mut self, patience: Duration) -> Self {
        self.rate_limit_patience = patience;
        self
    }

    /// The delay before retry number `attempt` (0-based): doubling from `retry_base`, at most
    /// 32 times it, plus up to 50 % random jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self.retry_base * (1u32 << attempt.min(5));
        base + base.mul_f64(rand::random::<f64>() * 0.5)
    }

    /// The REST base requests go to: the configured one, on the remembered new origin if the
    /// portal moved, or on `origin` (a redirect being followed) if given.
    fn base(&self, origin: Option<&Url>) -> Url {
        let mut base = configured_base(&self.auth);
        let moved = self.moved.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(o) = origin.or(moved.as_ref()) {
            let _ = base.set_scheme(o.scheme());
            let _ = base.set_host(o.host_str());
            let _ = base.set_port(o.port());
        }
        base
    }

    /// The origin the portal was remembered to have moved to, if any (for `ubsync check`).
    pub fn remembered_move(&self) -> Option<String> {
        self.moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(redirect::origin)
    }

    /// The configured REST address, without secrets (for messages).
    pub fn configured_origin(&self) -> String {
        redirect::origin(&configured_base(&self.auth))
    }

    /// Forgets a remembered move: requests go to the configured address again.
    pub fn forget_move(&self) -> Result<bool, Bitrix24Error> {
        let had = self
            .moved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some();
        self.store
            .lock()
            .delete_fact(&moved_fact_key(&configured_base(&self.auth)))
            .map_err(|e| Bitrix24Error::Unavailable {
                detail: format!("cannot update the state store: {e}"),
                outcome_unknown: false,
            })?;
        Ok(had)
    }

    /// Calls `app.info` with `access_token` (not the stored one) on the configured portal: the
    /// proof that tokens from an install callback belong to this portal and this application.
    /// Follows no redirect and refreshes nothing.
    pub async fn app_info_with(&self, access_token: &str) -> Result<Envelope, Bitrix24Error> {
        let url = self
            .base(None)
            .join("app.info")
            .expect("static method name");
        let mut body = Map::new();
        body.insert("auth".into(), Value::String(access_token.to_string()));
        self.send("app.info", url, &body).await
    }

    fn portal_key(&self) -> String {
        match &self.auth {
            Auth::Webhook(w) => portal_key(&w.expose()),
            Auth::OAuth { portal, .. } => portal_key(portal),
        }
    }

    /// Calls one method.
    pub async fn call(&self, method: &str, params: Value) -> Result<Envelope, Bitrix24Error> {
        let params = match params {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            other => {
                let mut m = Map::new();
                m.insert("value".into(), other);
                m
            }
        };
        self.request(method, params).await
    }

    /// Sends one batch (≤ 50 commands) and returns every command's outcome.
    pub async fn batch(
        &self,
        commands: &[Command],
        halt: bool,
    ) -> Result<BatchOutcome, Bitrix24Error> {
        assert!(
            commands.len() <= batch::MAX_COMMANDS,
            "a batch carries at most 50 commands"
        );
        let body = match batch::encode(commands, halt) {
            Value::Object(m) => m,
            _ => unreachable!("encode returns an object"),
        };
        let env = self.request("batch", body).await?;
        let out = BatchOutcome::from_result(&env.result);
        // Follow each nested method's budget; pause the ones the portal refused with 429.
        let now = self.clock.now();
        for c in commands {
            if let Some(t) = out.times.get(&c.key) {
                self.operating
                    .observe(&c.method, t.operating, t.operating_reset_at);
            }
            if out
                .errors
                .get(&c.key)
                .is_some_and(|e| e.effective_code() == "OPERATION_TIME_LIMIT")
            {
                self.stats.operation_limited.fetch_add(1, Ordering::Relaxed);
                self.operating.pause(&c.method, now);
                self.keep_pauses(now);
            }
        }
        Ok(out)
    }

    async fn request(
        &self,
        method: &str,
        params: Map<String, Value>,
    ) -> Result<Envelope, Bitrix24Error> {
        let mut refreshed = false;
        let mut redirects = 0;
        let mut following: Option<Url> = None;
        let mut rate_limited = 0u32;
        let mut rate_waited = Duration::ZERO;
        loop {
            let now = self.clock.now();
            if let Some(until) = self.operating.paused_until(method, now) {
                return Err(Bitrix24Error::OperationLimit {
                    method: method.into(),
                    reset_at: Some(until.timestamp()),
                });
            }
            let slow = self.operating.slowdown(method, now);
            if !slow.is_zero() {
                tracing::debug!(%method, delay_ms = slow.as_millis() as u64, "method near its operating budget; slowing down");
                tokio::time::sleep(slow).await;
            }
            let url = self
                .base(following.as_ref())
                .join(method)
                .expect("method names are URL-safe");
            let body = match &self.auth {
                Auth::Webhook(_) => params.clone(),
                Auth::OAuth { .. } => {
                    let tokens = self.tokens()?;
                    let mut body = params.clone();
                    body.insert("auth".into(), Value::String(tokens.access_token.clone()));
                    body
                }
            };
            match self.send(method, url.clone(), &body).await {
                Ok(env) => {
                    self.budget.on_success();
                    self.stats.answered.fetch_add(1, Ordering::Relaxed);
                    self.operating
                        .observe(method, env.time.operating, env.time.operating_reset_at);
                    return Ok(env);
                }
                Err(Bitrix24Error::RateLimited) if rate_waited < self.rate_limit_patience => {
                    // Nothing was executed: another app may be using the bucket. Slow down and
                    // try again; a pass never gives up because of this alone.
                    self.budget.on_rate_limited();
                    let delay = self.backoff(rate_limited);
                    rate_limited += 1;
                    rate_waited += delay;
                    tokio::time::sleep(delay).await;
                }
                Err(Bitrix24Error::OperationLimit { .. }) => {
                    let until = self.operating.pause(method, self.clock.now());
                    self.keep_pauses(self.clock.now());
                    return Err(Bitrix24Error::OperationLimit {
                        method: method.into(),
                        reset_at: Some(until.timestamp()),
                    });
                }
                Err(Bitrix24Error::Moved { status, location }) => {
                    redirects += 1;
                    following =
                        Some(self.relocate(&url, status, &location.0, method, redirects)?);
                }
                Err(Bitrix24Error::Auth { code, .. })
                    if !refreshed
                        && matches!(self.auth, Auth::OAuth { .. })
                        && (code == "expired_token" || code == "invalid_token") =>
                {
                    let stale = body
                        .get("auth")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    self.refresh(&stale).await?;
                    refreshed = true;
                }
                other => return other,
            }
        }
    }

    /// The portal answered a redirect (it moved, §1.2). Checks the target against the
    /// redirect policy ([`redirect::check`]) and the configured path, remembers a permanent move
    /// (as an origin only) so later requests go there directly, and returns the origin to re-POST
    /// this request to. Anything else is a configuration error naming both origins.
    fn relocate(
        &self,
        from: &Url,
        status: u16,
        location: &str,
        method: &str,
        redirects: u32,
    ) -> Result<Url, Bitrix24Error> {
        let configured = configured_base(&self.auth);
        let refuse = |to: String, reason: String| Bitrix24Error::Redirect {
            status,
            words: redirect::status_words(status),
            from: redirect::origin(from),
            to,
            reason,
        };
        let target = from.join(location).map_err(|_| {
            refuse(
                "(no usable Location)".into(),
                "the answer names no address".into(),
            )
        })?;
        let to = redirect::origin(&target);
        if redirects > 3 {
            return Err(refuse(to, "too many redirects in a row".into()));
        }
        let allow_http = self.allow_http || redirect::is_loopback(&configured);
        redirect::check(&configured, from, &target, allow_http)
            .map_err(|r| refuse(to.clone(), r))?;
        // The path must stay the configured REST path: a move changes the address, not the
        // webhook code or the API.
        let path_ok = match &self.auth {
            Auth::Webhook(_) => target.path().starts_with(configured.path()),
            Auth::OAuth { .. } => target.path().starts_with("/rest/"),
        };
        if !path_ok {
            return Err(refuse(to, "it leaves the configured REST path".into()));
        }
        let mut origin = target.clone();
        origin.set_path("/");
        origin.set_query(None);
        origin.set_fragment(None);
        if redirect::is_permanent(status) {
            self.store
                .lock()
                .set_fact(&moved_fact_key(&configured), &to, self.clock.now())
                .map_err(|e| Bitrix24Error::Unavailable {
                    detail: format!("cannot store the new portal address: {e}"),
                    outcome_unknown: false,
                })?;
            *self.moved.lock().unwrap_or_else(|p| p.into_inner()) = Some(origin.clone());
            tracing::warn!(
                from = %redirect::origin(&configured),
                to = %to,
                status,
                %method,
                "the Bitrix24 portal moved; requests now go to the new address; update bitrix24.portal_url / webhook_url in the config"
            );
        } else {
            tracing::info!(from = %redirect::origin(from), to = %to, status, %method, "following a temporary redirect");
        }
        Ok(origin)
    }

    /// The configuration key of the portal's address.
    fn url_key(&self) -> &'static str {
        match self.auth {
            Auth::Webhook(_) => "bitrix24.webhook_url",
            Auth::OAuth { .. } => "bitrix24.portal_url",
        }
    }

    #[allow(clippy::disallowed_methods)] // the one request to the portal, after `budget.acquire`
    async fn send(
        &self,
        method: &str,
        url: Url,
        body: &Map<String, Value>,
    ) -> Result<Envelope, Bitrix24Error> {
        self.budget.acquire().await;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.keep_bucket();
        let url_for_errors = url.clone();
        let resp =
            self.http.post(url).json(body).send().await.map_err(|e| {
                transport_error(e, &url_for_errors, self.url_key(), self.timeout_secs)
            })?;
        let status = resp.status().as_u16();
        if (300..400).contains(&status) {
            let location = resp
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .unwrap_or("")
                .to_string();
            return Err(Bitrix24Error::Moved {
                status,
                location: super::Hidden(location),
            });
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| transport_error(e, &url_for_errors, self.url_key(), self.timeout_secs))?;
        // A write is "not executed" only with proof (a documented pre-execution refusal);
        // anything else the portal may have run, so it must be probed, never re-sent blindly.
        match wire::decode(&bytes) {
            Decoded::Ok(env) if status < 300 => Ok(env),
            Decoded::Ok(_) => Err(Bitrix24Error::Unavailable {
                detail: format!("HTTP {status} with a result body"),
                outcome_unknown: true,
            }),
            Decoded::Error(e) => match self.classify(method, status, e) {
                Bitrix24Error::Api {
                    status,
                    code,
                    description,
                    ..
                } if method == "batch" && !pre_execution(&code) => {
                    Err(Bitrix24Error::Unavailable {
                        detail: format!("HTTP {status}: {code}: {description}"),
                        outcome_unknown: true,
                    })
                }
                other => Err(other),
            },
            // Bitrix24 answers an unknown method with a JSON error; an HTML 404 is another server.
            Decoded::Unreadable(_) if status == 404 => Err(Bitrix24Error::Misconfigured {
                detail: format!(
                    "{} answered HTTP 404 with a page that is not a Bitrix24 REST answer; check the host and path in {}",
                    crate::netdiag::host_of(&url_for_errors),
                    self.url_key()
                ),
                outcome_unknown: true,
            }),
            Decoded::Unreadable(snippet) => Err(Bitrix24Error::Unavailable {
                detail: format!("HTTP {status} with an unreadable body: {snippet}"),
                // 503 and 429 are the rate limits: refused before anything ran.
                outcome_unknown: status != 503 && status != 429,
            }),
        }
    }

    fn classify(&self, method: &str, status: u16, e: ErrorBody) -> Bitrix24Error {
        let code = e.effective_code();
        match code.as_str() {
            "QUERY_LIMIT_EXCEEDED" => {
                self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                Bitrix24Error::RateLimited
            }
            "OPERATION_TIME_LIMIT" => {
                self.stats.operation_limited.fetch_add(1, Ordering::Relaxed);
                Bitrix24Error::OperationLimit {
                    method: method.into(),
                    reset_at: None,
                }
            }
            "expired_token" | "invalid_token" => Bitrix24Error::Auth {
                code: code.clone(),
                description: e.description,
                hint: "reinstall the local application or run `ubsync auth set-refresh-token`"
                    .into(),
            },
            c if auth_hint(c).is_some()
                && (status == 401 || status == 403 || c != "ACCESS_DENIED") =>
            {
                Bitrix24Error::Auth {
                    hint: auth_hint(c).unwrap_or_default().into(),
                    code,
                    description: e.description,
                }
            }
            _ if status >= 500 => Bitrix24Error::Unavailable {
                detail: format!("HTTP {status}: {} {}", e.code, e.description),
                outcome_unknown: true,
            },
            _ => Bitrix24Error::Api {
                method: method.into(),
                status,
                code: e.code,
                description: e.description,
            },
        }
    }

    fn tokens(&self) -> Result<OAuthTokens, Bitrix24Error> {
        let key = self.portal_key();
        let found = self
            .store
            .lock()
            .tokens(&key)
            .map_err(|e| Bitrix24Error::Unavailable {
                detail: format!("cannot read tokens: {e}"),
                outcome_unknown: false,
            })?;
        found.ok_or(Bitrix24Error::NoTokens { portal: key })
    }

    /// Proves the application's `client_id`/`client_secret`: refreshes the stored pair now (the
    /// new pair is stored before it is used, as at any refresh). A stored access token keeps
    /// working for up to an hour with wrong credentials; this fails at once.
    pub async fn prove_client_credentials(&self) -> Result<(), Bitrix24Error> {
        let _guard = self.refresh_lock.lock().await;
        let current = self.tokens()?;
        self.exchange(&current.refresh_token).await.map(|_| ())
    }

    /// The portal's host and port, and whether they can be reached: a name that resolves and
    /// a port that accepts a TCP connection within `within`. `Err` says which of the two failed.
    /// (No HTTP request: nothing reaches the portal's request budget.)
    pub async fn reach(&self, within: Duration) -> Result<String, String> {
        let url = configured_base(&self.auth);
        let host = url.host_str().unwrap_or("").to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs = match tokio::time::timeout(
            within,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(a)) => a.collect::<Vec<_>>(),
            Ok(Err(e)) => return Err(format!("the name {host} does not resolve ({e})")),
            Err(_) => return Err(format!("resolving {host} took longer than {within:?}")),
        };
        let Some(addr) = addrs.first() else {
            return Err(format!("the name {host} resolves to no address"));
        };
        match tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(format!("{host}:{port}")),
            Ok(Err(e)) => Err(format!("{host}:{port} ({addr}) refuses connections ({e})")),
            Err(_) => Err(format!(
                "{host}:{port} ({addr}) did not answer within {within:?}"
            )),
        }
    }

    /// Refreshes the OAuth pair unless another task already replaced `stale`.
    async fn refresh(&self, stale_access: &str) -> Result<(), Bitrix24Error> {
        let _guard = self.refresh_lock.lock().await;
        let current = self.tokens()?;
        if current.access_token != stale_access {
            return Ok(());
        }
        self.exchange(&current.refresh_token).await.map(|_| ())
    }

    /// Exchanges `refresh_token` at the OAuth server and stores the new pair at once.
    #[allow(clippy::disallowed_methods)] // the OAuth server, not the portal: outside its budget
    pub async fn exchange(&self, refresh_token: &str) -> Result<OAuthTokens, Bitrix24Error> {
        let Auth::OAuth {
            client_id,
            client_secret,
            oauth_url,
            ..
        } = &self.auth
        else {
            return Err(Bitrix24Error::Auth {
                code: "WRONG_AUTH_TYPE".into(),
                description: "token exchange needs an OAuth local application".into(),
                hint: auth_hint("WRONG_AUTH_TYPE").unwrap_or_default().into(),
            });
        };
        let url = oauth_url.join("/oauth/token/").expect("valid OAuth URL");
        let url_for_errors = url.clone();
        // The OAuth server takes its parameters in the query string (§1.3); reqwest errors are
        // stripped of the URL below, so the secret and token never reach a log.
        let resp = self
            .http
            .get(url)
            .query(&[
                ("grant_type", "refresh_token"),
                ("client_id", client_id.as_str()),
                ("client_secret", client_secret.expose_secret()),
                ("refresh_token", refresh_token),
            ])
            .send()
            .await
            .map_err(|e| {
                transport_error(e, &url_for_errors, "bitrix24.oauth_url", self.timeout_secs)
            })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| {
            transport_error(e, &url_for_errors, "bitrix24.oauth_url", self.timeout_secs)
        })?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if let Some(code) = v.get("error").and_then(Value::as_str) {
            let description = v
                .get("error_description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            return Err(Bitrix24Error::Auth {
                hint: auth_hint(code)
                    .unwrap_or("check the application's settings in the portal")
                    .into(),
                code: code.into(),
                description,
            });
        }
        let (Some(access), Some(refresh)) = (
            v.get("access_token").and_then(Value::as_str),
            v.get("refresh_token").and_then(Value::as_str),
        ) else {
            return Err(Bitrix24Error::Unavailable {
                detail: format!("OAuth server answered HTTP {status} without tokens"),
                outcome_unknown: true,
            });
        };
        let now = self.clock.now();
        let tokens = OAuthTokens {
            access_token: access.into(),
            refresh_token: refresh.into(),
            expires_at: v
                .get("expires")
                .and_then(wire::as_i64)
                .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                .or_else(|| {
                    v.get("expires_in")
                        .and_then(wire::as_i64)
                        .map(|s| now + chrono::Duration::seconds(s))
                }),
            // Requests go only to the configured portal: endpoints from answers are not kept.
            client_endpoint: None,
            server_endpoint: None,
            member_id: v
                .get("member_id")
                .and_then(Value::as_str)
                .map(str::to_string),
            application_token: None,
            scope: v.get("scope").and_then(Value::as_str).map(str::to_string),
        };
        self.store
            .lock()
            .save_tokens(&self.portal_key(), &tokens, now)
            .map_err(|e| Bitrix24Error::Unavailable {
                detail: format!("refreshed tokens could not be stored: {e}"),
                outcome_unknown: false,
            })?;
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(portal = %self.portal_key(), "OAuth tokens refreshed and stored");
        Ok(tokens)
    }
}
