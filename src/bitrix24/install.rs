//! The local application's install callback: how a server-side Bitrix24 application receives its
//! first OAuth tokens.
//!
//! Right after an admin adds the local application, the portal POSTs the authorization data to
//! the "installation path", form-encoded: `auth[access_token]`, `auth[refresh_token]`,
//! `auth[expires_in]`, `auth[domain]`, `auth[member_id]`, `auth[application_token]`,
//! `auth[client_endpoint]`, `auth[server_endpoint]`, ... (the `ONAPPINSTALL` event form). The
//! install-page form (`AUTH_ID`, `REFRESH_ID`, `member_id`, `DOMAIN` in the query) is accepted
//! too. The handler checks that the data is for the configured portal (and the member already
//! stored, if any), stores the pair in one statement, and answers 200 (no `BX24.installFinish`:
//! no browser is involved).

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

use super::client::portal_key;
use crate::clock::Clock;
use crate::phpquery;
use crate::store::{OAuthTokens, SharedStore};

/// What the install callback route needs.
#[derive(Clone)]
pub struct InstallState {
    pub portal: Url,
    pub store: SharedStore,
    pub clock: Clock,
    /// Notified after each successful install (for `auth serve --once`).
    pub installed: Arc<Notify>,
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

/// Checks a parsed callback against the configured portal and the stored member, and stores it.
pub fn accept(state: &InstallState, query: &str, body: &str) -> Result<String, InstallError> {
    let now = state.clock.now();
    let (tokens, domain) = parse_callback(query, body, now)?;
    let want = portal_key(&state.portal);
    let got = domain
        .as_deref()
        .map(|d| {
            d.trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_lowercase()
        })
        .or_else(|| {
            tokens
                .client_endpoint
                .as_deref()
                .and_then(|e| Url::parse(e).ok())
                .map(|u| portal_key(&u))
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
    let store = state.store.lock();
    if let (Some(stored), Some(new)) = (
        store.tokens(&want).ok().flatten().and_then(|t| t.member_id),
        tokens.member_id.clone(),
    ) {
        if stored != new {
            return Err(InstallError::WrongMember {
                got: new,
                want: stored,
            });
        }
    }
    store
        .save_tokens(&want, &tokens, now)
        .map_err(|_| InstallError::NoTokens)?;
    tracing::info!(portal = %want, "local application installed; OAuth tokens stored");
    Ok(want)
}

async fn callback(
    State(state): State<InstallState>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let body = String::from_utf8_lossy(&body);
    match accept(&state, query.as_deref().unwrap_or(""), &body) {
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
            let status = if e == InstallError::NoTokens {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::FORBIDDEN
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
