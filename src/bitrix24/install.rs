//! The local application's install callback: how a server-side Bitrix24 application receives its
//! first OAuth tokens.
//!
//! Right after an admin adds the local application, the portal POSTs the authorization data to
//! the "installation path", form-encoded: `auth[access_token]`, `auth[refresh_token]`,
//! `auth[expires_in]`, `auth[domain]`, `auth[member_id]`, `auth[application_token]`,
//! `auth[client_endpoint]`, `auth[server_endpoint]`, ... (the `ONAPPINSTALL` event form). The
//! install-page form (`AUTH_ID`, `REFRESH_ID`, `member_id`, `DOMAIN` in the query) is accepted
//! too. Anyone who can reach the route can POST such a form, so nothing in it is believed until
//! proven:
//! - it must name the configured portal and carry a `member_id` (the stored one, if any);
//! - once an install stored an `application_token`, every later callback must carry the same
//!   one (compared in constant time);
//! - the new access token must work on the *configured* portal: `app.info` there must answer for
//!   the configured `client_id` (and member);
//! - endpoints in the callback (`client_endpoint`, `server_endpoint`) are never used or stored:
//!   requests go only to the configured `portal_url` and `oauth_url`.
//!
//! Only then is the pair stored, in one statement, and 200 answered (no `BX24.installFinish`: no
//! browser is involved). A refused callback stores nothing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use chrono::Duration;
use serde_json::{Map, Value};
use tokio::sync::Notify;
use url::Url;

use subtle::ConstantTimeEq;

use super::client::portal_key;
use super::Bitrix24Client;
use crate::clock::Clock;
use crate::config::Config;
use crate::phpquery;
use crate::store::{OAuthTokens, SharedStore};

/// What the install callback route needs.
#[derive(Clone)]
pub struct InstallState {
    pub portal: Url,
    pub client_id: String,
    pub store: SharedStore,
    pub clock: Clock,
    /// Proves tokens on the configured portal (`app.info`).
    pub client: Arc<Bitrix24Client>,
    /// Notified after each successful install (for `auth serve --once`).
    pub installed: Arc<Notify>,
}

impl InstallState {
    /// The install route's state for a telephony-mode configuration.
    pub fn new(
        cfg: &Config,
        store: SharedStore,
        clock: Clock,
    ) -> Result<Self, super::Bitrix24Error> {
        let client = Bitrix24Client::new(&cfg.bitrix24, store.clone(), clock.clone())?
            .with_rate_limit_patience(std::time::Duration::from_secs(30));
        Ok(Self {
            portal: cfg
                .bitrix24
                .portal_url
                .clone()
                .expect("validated by config"),
            client_id: cfg.bitrix24.client_id.clone().expect("validated by config"),
            store,
            clock,
            client: Arc::new(client),
            installed: Arc::new(Notify::new()),
        })
    }
}

/// Why an install callback was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    #[error("the callback carries no access and refresh token")]
    NoTokens,
    #[error("the callback is for portal {got}, but ubsync is configured for {want}")]
    WrongPortal { got: String, want: String },
    #[error("the callback is for member {got}, but the stored tokens belong to member {want}")]
    WrongMember { got: String, want: String },
    #[error("the callback carries no member_id")]
    NoMember,
    #[error("the callback's application_token is missing or differs from the one stored at install; if the application was reinstalled, run `ubsync auth forget-install` and install again")]
    WrongApplicationToken,
    #[error("the portal did not accept the callback's access token: {0}")]
    TokensRejected(String),
    #[error(
        "the callback's tokens belong to application {got}, not the configured bitrix24.client_id"
    )]
    WrongApplication { got: String },
    #[error("the state store failed: {0}")]
    Store(String),
}

fn text(m: &Map<String, Value>, path: &[&str]) -> Option<String> {
    let mut cur = m.get(path[0])?;
    for p in &path[1..] {
        cur = cur.get(*p)?;
    }
    match cur {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Reads the tokens and the portal domain from an install callback (query and body merged).
pub fn parse_callback(
    query: &str,
    body: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(OAuthTokens, Option<String>), InstallError> {
    let mut p = phpquery::parse(query);
    p.extend(phpquery::parse(body));
    let t = |keys: &[&[&str]]| keys.iter().find_map(|k| text(&p, k));
    let access = t(&[&["auth", "access_token"], &["AUTH_ID"]]).ok_or(InstallError::NoTokens)?;
    let refresh =
        t(&[&["auth", "refresh_token"], &["REFRESH_ID"]]).ok_or(InstallError::NoTokens)?;
    let expires_in =
        t(&[&["auth", "expires_in"], &["AUTH_EXPIRES"]]).and_then(|s| s.parse::<i64>().ok());
    let domain = t(&[&["auth", "domain"], &["DOMAIN"]]);
    Ok((
        OAuthTokens {
            access_token: access,
            refresh_token: refresh,
            expires_at: t(&[&["auth", "expires"]])
                .and_then(|s| s.parse::<i64>().ok())
                .and_then(|e| chrono::DateTime::from_timestamp(e, 0))
                .or(expires_in.map(|s| now + Duration::seconds(s))),
            client_endpoint: t(&[&["auth", "client_endpoint"]]),
            server_endpoint: t(&[&["auth", "server_endpoint"]]),
            member_id: t(&[&["auth", "member_id"], &["member_id"]]),
            application_token: t(&[&["auth", "application_token"], &["APP_SID"]]),
            scope: t(&[&["auth", "scope"]]),
        },
        domain,
    ))
}

/// Checks a parsed callback against the configured portal, the stored install and the portal
/// itself, and stores it only if every check passes.
pub async fn accept(state: &InstallState, query: &str, body: &str) -> Result<String, InstallError> {
    let now = state.clock.now();
    let (mut tokens, domain) = parse_callback(query, body, now)?;
    let want = portal_key(&state.portal);
    let got = domain.as_deref().map(|d| {
        d.trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_lowercase()
    });
    match got {
        Some(g) if g == want.to_lowercase() => {}
        Some(g) => return Err(InstallError::WrongPortal { got: g, want }),
        None => {
            return Err(InstallError::WrongPortal {
                got: "(none)".into(),
                want,
            })
        }
    }
    let member = tokens.member_id.clone().ok_or(InstallError::NoMember)?;
    let stored = state
        .store
        .lock()
        .tokens(&want)
        .map_err(|e| InstallError::Store(e.to_string()))?;
    if let Some(stored) = &stored {
        if let Some(m) = stored.member_id.as_ref().filter(|m| **m != member) {
            return Err(InstallError::WrongMember {
                got: member,
                want: m.clone(),
            });
        }
        if let Some(app_token) = &stored.application_token {
            let given = tokens.application_token.as_deref().unwrap_or("");
            if !bool::from(given.as_bytes().ct_eq(app_token.as_bytes())) {
                return Err(InstallError::WrongApplicationToken);
            }
        }
    }
    // The proof: the configured portal itself must accept the new token for our application.
    let info = state
        .client
        .app_info_with(&tokens.access_token)
        .await
        .map_err(|e| InstallError::TokensRejected(e.to_string()))?;
    let info = info.result.as_object().cloned().unwrap_or_default();
    let field = |keys: &[&str]| {
        keys.iter().find_map(|k| match info.get(*k) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    };
    let app = field(&["CLIENT_ID", "client_id", "CODE"]).unwrap_or_default();
    if !bool::from(app.as_bytes().ct_eq(state.client_id.as_bytes())) {
        return Err(InstallError::WrongApplication {
            got: if app.is_empty() { "(none)".into() } else { app },
        });
    }
    if let Some(m) = field(&["MEMBER_ID", "member_id"]).filter(|m| *m != member) {
        return Err(InstallError::WrongMember {
            got: member,
            want: m,
        });
    }
    // Endpoints from the callback are never trusted.
    tokens.client_endpoint = None;
    tokens.server_endpoint = None;
    state
        .store
        .lock()
        .save_tokens(&want, &tokens, now)
        .map_err(|e| InstallError::Store(e.to_string()))?;
    tracing::info!(portal = %want, "local application installed; tokens proven with app.info and stored");
    Ok(want)
}

async fn callback(
    State(state): State<InstallState>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let body = String::from_utf8_lossy(&body);
    match accept(&state, query.as_deref().unwrap_or(""), &body).await {
        Ok(portal) => {
            state.installed.notify_waiters();
            (
                StatusCode::OK,
                format!("ubsync: installed; OAuth tokens stored for {portal}\n"),
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "install callback refused");
            let status = match e {
                InstallError::NoTokens | InstallError::NoMember => StatusCode::BAD_REQUEST,
                InstallError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::FORBIDDEN,
            };
            (status, format!("ubsync: {e}\n")).into_response()
        }
    }
}

/// The install callback route: `POST /install` (and `POST /`, for an installation path without
/// a path).
pub fn router(state: InstallState) -> Router {
    Router::new()
        .route("/install", post(callback))
        .route("/", post(callback))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_callback_forms_are_read() {
        let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let body = "event=ONAPPINSTALL&auth%5Baccess_token%5D=a1&auth%5Brefresh_token%5D=r1&auth%5Bexpires_in%5D=3600&auth%5Bdomain%5D=p.bitrix24.ua&auth%5Bmember_id%5D=m";
        let (t, d) = parse_callback("", body, now).unwrap();
        assert_eq!(
            (
                t.access_token.as_str(),
                t.refresh_token.as_str(),
                d.as_deref()
            ),
            ("a1", "r1", Some("p.bitrix24.ua"))
        );
        assert_eq!(t.expires_at.unwrap().timestamp(), 1_800_003_600);
        let (t, d) = parse_callback(
            "DOMAIN=p.bitrix24.ua&APP_SID=x",
            "AUTH_ID=a2&REFRESH_ID=r2&member_id=m",
            now,
        )
        .unwrap();
        assert_eq!(
            (t.access_token.as_str(), d.as_deref()),
            ("a2", Some("p.bitrix24.ua"))
        );
        assert_eq!(
            parse_callback("", "event=ONAPPINSTALL", now).unwrap_err(),
            InstallError::NoTokens
        );
    }
}
