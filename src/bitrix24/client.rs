//! The HTTP client for one portal.
//!
//! Every request (a batch is one) waits for the client-side limiter first; nothing reaches the
//! portal around it. Requests are JSON POSTs with automatic redirects disabled (a 302 means the
//! portal moved, §1.2). In OAuth mode the access token goes in the body, never the URL, and a 401
//! `expired_token`/`invalid_token` triggers one refresh, single-flight across concurrent
//! requests, whose new pair is stored before it is used. Errors never carry URLs (webhook codes
//! and tokens live there).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use url::Url;

use super::batch::{self, Command};
use super::wire::{self, BatchOutcome, Decoded, Envelope, ErrorBody};
use super::{auth_hint, Bitrix24Error};
use crate::clock::Clock;
use crate::config::{Bitrix24Config, Mode, WebhookUrl};
use crate::store::{OAuthTokens, SharedStore};

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub rate_limited: AtomicU64,
    pub operation_limited: AtomicU64,
    pub refreshes: AtomicU64,
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
    limiter: DefaultDirectRateLimiter,
    store: SharedStore,
    clock: Clock,
    /// Held while refreshing so concurrent 401s refresh once.
    refresh_lock: tokio::sync::Mutex<()>,
    pub stats: Arc<ClientStats>,
}

/// The store key of a portal's tokens.
pub fn portal_key(url: &Url) -> String {
    url.host_str().unwrap_or("portal").to_string()
        + &url.port().map(|p| format!(":{p}")).unwrap_or_default()
}

fn transport_error(e: reqwest::Error, sent: bool) -> Bitrix24Error {
    let e = e.without_url();
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transport error"
    };
    Bitrix24Error::Unavailable {
        detail: format!("{kind}: {e}"),
        outcome_unknown: sent && !e.is_connect(),
    }
}

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
        let quota = Quota::per_second(cfg.per_second).allow_burst(cfg.burst);
        Ok(Self {
            http,
            auth,
            limiter: RateLimiter::direct(quota),
            store,
            clock,
            refresh_lock: tokio::sync::Mutex::new(()),
            stats: Arc::new(ClientStats::default()),
        })
    }

    /// A limiter-free burst for tests that need a specific pacing.
    #[doc(hidden)]
    pub fn with_rate(mut self, per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        self.limiter = RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst));
        self
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
        Ok(BatchOutcome::from_result(&env.result))
    }

    async fn request(
        &self,
        method: &str,
        params: Map<String, Value>,
    ) -> Result<Envelope, Bitrix24Error> {
        let mut refreshed = false;
        loop {
            let (url, body) = match &self.auth {
                Auth::Webhook(w) => (
                    w.expose().join(method).expect("method names are URL-safe"),
                    params.clone(),
                ),
                Auth::OAuth { portal, .. } => {
                    let tokens = self.tokens()?;
                    let base = tokens
                        .client_endpoint
                        .as_deref()
                        .and_then(|e| Url::parse(e).ok())
                        .unwrap_or_else(|| portal.join("/rest/").expect("valid portal URL"));
                    let mut body = params.clone();
                    body.insert("auth".into(), Value::String(tokens.access_token.clone()));
                    (base.join(method).expect("method names are URL-safe"), body)
                }
            };
            match self.send(method, url, &body).await {
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

    async fn send(
        &self,
        method: &str,
        url: Url,
        body: &Map<String, Value>,
    ) -> Result<Envelope, Bitrix24Error> {
        self.limiter.until_ready().await;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let resp = self
            .http
            .post(url)
            .json(body)
            .send()
            .await
            .map_err(|e| transport_error(e, true))?;
        let status = resp.status().as_u16();
        if (300..400).contains(&status) {
            let location = resp
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .unwrap_or("")
                .to_string();
            return Err(Bitrix24Error::Moved { location });
        }
        let bytes = resp.bytes().await.map_err(|e| transport_error(e, true))?;
        match wire::decode(&bytes) {
            Decoded::Ok(env) if status < 300 => Ok(env),
            Decoded::Ok(_) => Err(Bitrix24Error::Unavailable {
                detail: format!("HTTP {status} with a result body"),
                outcome_unknown: true,
            }),
            Decoded::Error(e) => Err(self.classify(method, status, e)),
            Decoded::Unreadable(snippet) if status >= 500 || status == 429 => {
                Err(Bitrix24Error::Unavailable {
                    detail: format!("HTTP {status}: {snippet}"),
                    outcome_unknown: status != 503 && status != 429,
                })
            }
            Decoded::Unreadable(snippet) => Err(Bitrix24Error::Api {
                method: method.into(),
                status,
                code: String::new(),
                description: snippet,
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
            .map_err(|e| transport_error(e, true))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| transport_error(e, true))?;
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
            client_endpoint: v
                .get("client_endpoint")
                .and_then(Value::as_str)
                .map(str::to_string),
            server_endpoint: v
                .get("server_endpoint")
                .and_then(Value::as_str)
                .map(str::to_string),
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
