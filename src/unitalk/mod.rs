//! Everything ubsync knows about Unitalk: the HTTP client and the tolerant wire parsing.
//!
//! The client keeps one request in flight (Unitalk bills by processing time and documents no
//! rate limit), sends the key in `Authorization`, treats any `"status":"Error"` body as an error
//! whatever the HTTP status, and records the request units each call costs. Its boundary error
//! [`UnitalkError`] says whether retrying can help.

pub mod webhook;
pub mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use secrecy::ExposeSecret;
use serde_json::{json, Value};
use url::Url;

use crate::config::UnitalkConfig;

pub use wire::{Call, CallState, Direction, HistoryPage, LineStatus, RecordError, UnitalkUser};

/// Why a Unitalk request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UnitalkError {
    /// The key was refused; an admin must fix `unitalk.api_key`.
    #[error(
        "unitalk refused the API key ({message}); check unitalk.api_key or {}",
        crate::config::ENV_UNITALK_API_KEY
    )]
    Auth { message: String },
    /// Unitalk answered `"status":"Error"` for a reason other than auth.
    #[error("unitalk {path} failed: {message}")]
    Api { path: String, message: String },
    /// Transport error, timeout, 5xx or an unreadable body: retry later.
    #[error("unitalk temporarily unavailable: {detail}")]
    Unavailable { detail: String },
    /// The configured address does not lead to Unitalk's API (the name does not resolve, TLS
    /// fails, another server answers 404): an admin must fix `unitalk.base_url`.
    #[error("unitalk cannot be reached as configured: {detail}")]
    Misconfigured { detail: String },
    /// A redirect ubsync will not follow (another domain, a downgrade to http, a loop): the key
    /// would go elsewhere; an admin must check `unitalk.base_url`.
    #[error("unitalk answered HTTP {status} ({}) from {from} to {to}, which ubsync will not follow: the API key would go elsewhere; check unitalk.base_url", crate::bitrix24::redirect::status_words(*status))]
    Redirect {
        status: u16,
        from: String,
        to: String,
    },
}

impl UnitalkError {
    pub fn is_retryable(&self) -> bool {
        match self {
            UnitalkError::Unavailable { .. } => true,
            // "Internal error" is documented as something to report, but it is transient often
            // enough that a later pass should try again.
            UnitalkError::Api { message, .. } => message.eq_ignore_ascii_case("Internal error"),
            UnitalkError::Auth { .. }
            | UnitalkError::Redirect { .. }
            | UnitalkError::Misconfigured { .. } => false,
        }
    }
}

/// A request body.
enum Payload {
    Json(Value),
    Form(Vec<(String, String)>),
}

/// Unitalk's price of one request (§1.4), from its processing time.
pub fn request_units(elapsed: std::time::Duration) -> u64 {
    match elapsed.as_millis() {
        0..50 => 1,
        50..200 => 2,
        200..500 => 3,
        500..1000 => 4,
        _ => 5,
    }
}

/// A Unitalk API client.
pub struct UnitalkClient {
    http: reqwest::Client,
    base: Url,
    cfg: UnitalkConfig,
    /// One request in flight at a time.
    gate: tokio::sync::Mutex<()>,
    pub units: Arc<AtomicU64>,
    pub requests: Arc<AtomicU64>,
    /// The last `Date` header Unitalk sent, and when (monotonic) it arrived: a second source of
    /// the time, so a system clock that jumped ahead cannot move the cursor into the future.
    server_time: std::sync::Mutex<Option<(chrono::DateTime<chrono::Utc>, Instant)>>,
}

impl UnitalkClient {
    pub fn new(cfg: &UnitalkConfig) -> Result<Self, UnitalkError> {
        // Redirects: only those `redirect::check` allows (https, the configured domain), at most
        // three; any other stops and is reported as a configuration error.
        let configured = cfg.base_url.clone();
        let allow_http = cfg.allow_insecure_http;
        let policy = reqwest::redirect::Policy::custom(move |attempt| {
            let from = attempt.previous().last().cloned();
            let ok = attempt.previous().len() <= 3
                && from.as_ref().is_some_and(|f| {
                    crate::bitrix24::redirect::check(&configured, f, attempt.url(), allow_http)
                        .is_ok()
                });
            if ok {
                attempt.follow()
            } else {
                attempt.stop()
            }
        });
        let http = reqwest::Client::builder()
            .redirect(policy)
            .timeout(cfg.request_timeout)
            .connect_timeout(std::time::Duration::from_secs(15))
            .user_agent(concat!("ubsync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UnitalkError::Unavailable {
                detail: format!("cannot build HTTP client: {}", e.without_url()),
            })?;
        let mut base = cfg.base_url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(Self {
            http,
            base,
            cfg: cfg.clone(),
            gate: tokio::sync::Mutex::new(()),
            units: Arc::new(AtomicU64::new(0)),
            requests: Arc::new(AtomicU64::new(0)),
            server_time: std::sync::Mutex::new(None),
        })
    }

    fn transport_error(&self, e: reqwest::Error) -> UnitalkError {
        let e = e.without_url();
        let failure = crate::netdiag::classify(&e);
        let what = crate::netdiag::explain(
            failure,
            &crate::netdiag::host_of(&self.base),
            "unitalk.base_url",
            self.cfg.request_timeout.as_secs(),
        );
        if failure.is_configuration() {
            UnitalkError::Misconfigured { detail: what }
        } else {
            UnitalkError::Unavailable {
                detail: format!("{what}: {e}"),
            }
        }
    }

    /// POSTs `body` to `path` and returns the JSON answer, errors classified.
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, UnitalkError> {
        self.send(path, Payload::Json(body)).await
    }

    #[allow(clippy::disallowed_methods)] // the one request to Unitalk
    async fn send(&self, path: &str, body: Payload) -> Result<Value, UnitalkError> {
        let _one_at_a_time = self.gate.lock().await;
        let url = self.base.join(path).expect("static paths are valid");
        let started = Instant::now();
        let req = self
            .http
            .post(url)
            .header("Authorization", self.cfg.api_key.expose_secret());
        let req = match &body {
            Payload::Json(v) => req.json(v),
            Payload::Form(pairs) => req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(
                    url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(pairs)
                        .finish(),
                ),
        };
        let sent = req.send().await;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let resp = sent.map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        if let Some(date) = resp
            .headers()
            .get("date")
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
        {
            *self.server_time.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((chrono::DateTime::<chrono::Utc>::from(date), Instant::now()));
        }
        if status.is_redirection() {
            let to = resp
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .and_then(|l| resp.url().join(l).ok())
                .map(|u| crate::bitrix24::redirect::origin(&u))
                .unwrap_or_else(|| "(no usable Location)".into());
            return Err(UnitalkError::Redirect {
                status: status.as_u16(),
                from: crate::bitrix24::redirect::origin(resp.url()),
                to,
            });
        }
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        self.units
            .fetch_add(request_units(started.elapsed()), Ordering::Relaxed);
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        if let Some(v) = &parsed {
            if v.get("status")
                .and_then(Value::as_str)
                .is_some_and(|s| s.eq_ignore_ascii_case("error"))
            {
                let message = v
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("(no message)")
                    .to_string();
                if message.to_lowercase().contains("authorization") {
                    return Err(UnitalkError::Auth { message });
                }
                return Err(UnitalkError::Api {
                    path: path.into(),
                    message,
                });
            }
        }
        match parsed {
            Some(v) if status.is_success() => Ok(v),
            // Unitalk answers its errors as JSON; a 404 page comes from another server or path.
            None if status.as_u16() == 404 => Err(UnitalkError::Misconfigured {
                detail: format!(
                    "{} answered HTTP 404 for /{path} with a page that is not a Unitalk API answer; check unitalk.base_url (default https://api.unitalk.cloud/api/)",
                    crate::netdiag::host_of(&self.base)
                ),
            }),
            _ => {
                let snippet: String = String::from_utf8_lossy(&bytes).chars().take(120).collect();
                Err(UnitalkError::Unavailable {
                    detail: format!(
                        "HTTP {} from {path}: {}",
                        status.as_u16(),
                        snippet.split_whitespace().collect::<Vec<_>>().join(" ")
                    ),
                })
            }
        }
    }

    /// `POST /phones/directCall` (form body, as the known clients send it): Unitalk rings the
    /// inner line `sip` first, then `number`. `meta` travels with the call (whether Unitalk
    /// echoes it anywhere is unconfirmed). Not idempotent: a second request rings again.
    pub async fn direct_call(
        &self,
        sip: &str,
        number: &str,
        meta: &str,
    ) -> Result<(), UnitalkError> {
        self.send(
            "phones/directCall",
            Payload::Form(vec![
                ("sip".into(), sip.into()),
                ("number".into(), number.into()),
                ("meta".into(), meta.into()),
            ]),
        )
        .await
        .map(|_| ())
    }

    /// One page of `/history/get` over `[from, to]` (wall-clock strings in Unitalk's zone).
    pub async fn history_page(
        &self,
        from: &str,
        to: &str,
        limit: u32,
        offset: u64,
    ) -> Result<HistoryPage, UnitalkError> {
        let body =
            json!({"dateFrom": from, "dateTo": to, "limit": limit, "offset": offset, "filter": {}});
        let v = self.post("history/get", body).await?;
        wire::parse_history(&v).map_err(|message| UnitalkError::Unavailable {
            detail: format!("unreadable /history/get answer: {message}"),
        })
    }

    /// `/users/list`.
    pub async fn users(&self) -> Result<Vec<UnitalkUser>, UnitalkError> {
        let v = self.post("users/list", json!({})).await?;
        wire::parse_users(&v).map_err(|message| UnitalkError::Unavailable {
            detail: format!("unreadable /users/list answer: {message}"),
        })
    }

    /// `/phones/inner` (shape unconfirmed; see [`wire::parse_lines`]).
    pub async fn inner_lines(&self) -> Result<Vec<LineStatus>, UnitalkError> {
        let v = self.post("phones/inner", json!({})).await?;
        wire::parse_lines(&v).map_err(|message| UnitalkError::Unavailable {
            detail: format!("unreadable /phones/inner answer: {message}"),
        })
    }

    /// Unitalk's idea of now: its last `Date` header plus the time since it arrived.
    pub fn server_now(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let (at, when) = (*self.server_time.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some(at + chrono::Duration::from_std(when.elapsed()).unwrap_or_default())
    }

    pub fn timezone(&self) -> chrono_tz::Tz {
        self.cfg.timezone
    }
}
