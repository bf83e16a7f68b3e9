//! Events in over HTTP (served by `ubsync run --listen` only when configured):
//! `POST /unitalk/webhook/<secret>` and `POST /bitrix24/events`. Unitalk does not sign its payloads, so the secret in the
//! path is the credential: compared in constant time, a wrong one is a plain 404 that touches
//! nothing. An accepted event is persisted in the store's inbox before it is answered, then
//! processed from there by the daemon's worker (which pushes within seconds).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

use crate::clock::Clock;
use crate::store::SharedStore;

/// What the inbound routes need.
#[derive(Clone)]
pub struct Inbound {
    pub store: SharedStore,
    pub clock: Clock,
    pub unitalk_secret: Option<Arc<SecretString>>,
    /// Serve `POST /bitrix24/events`.
    pub b24_events: bool,
    /// The store key of the portal's tokens (whose `application_token` events must carry).
    pub portal_key: Option<String>,
    /// The configured application token, when the install callback stored none.
    pub app_token: Option<Arc<SecretString>>,
    /// Wakes the worker: an event waits.
    pub kick: mpsc::Sender<()>,
}

/// The largest event body accepted.
const MAX_BODY: usize = 256 * 1024;

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

async fn unitalk_webhook(
    State(st): State<Inbound>,
    Path(secret): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(want) = &st.unitalk_secret else {
        return not_found();
    };
    if !bool::from(secret.as_bytes().ct_eq(want.expose_secret().as_bytes())) {
        tracing::warn!("a Unitalk webhook with a wrong secret was refused");
        return not_found();
    }
    if body.len() > MAX_BODY {
        return (StatusCode::PAYLOAD_TOO_LARGE, "too large\n").into_response();
    }
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return (StatusCode::BAD_REQUEST, "the body is not UTF-8\n").into_response();
    };
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let saved = st
        .store
        .lock()
        .inbox_add("unitalk", &text, ct.as_deref(), st.clock.now());
    match saved {
        Ok(_) => {
            let _ = st.kick.try_send(());
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                "{\"status\":\"success\"}",
            )
                .into_response()
        }
        Err(e) => {
            // Not stored: say so, so a sender that retries does.
            tracing::error!(error = %e, "a Unitalk webhook could not be stored");
            (StatusCode::SERVICE_UNAVAILABLE, "cannot store the event\n").into_response()
        }
    }
}

/// `POST /bitrix24/events`: a form-encoded event whose `auth[application_token]` must be the
/// application's (checked in constant time before anything is stored).
async fn bitrix24_event(State(st): State<Inbound>, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return (StatusCode::PAYLOAD_TOO_LARGE, "too large\n").into_response();
    }
    let text = String::from_utf8_lossy(&body).to_string();
    let fields = crate::phpquery::parse(&text);
    let given = fields
        .get("auth")
        .and_then(|a| a.get("application_token"))
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
        .to_string();
    let stored = st
        .portal_key
        .as_ref()
        .and_then(|k| st.store.lock().tokens(k).ok().flatten())
        .and_then(|t| t.application_token);
    let want = stored.or_else(|| st.app_token.as_ref().map(|t| t.expose_secret().to_string()));
    let Some(want) = want else {
        tracing::error!("a Bitrix24 event arrived, but no application token is known to check it: install the application through its install callback (`ubsync auth serve`) or set webhooks.application_token");
        return (StatusCode::FORBIDDEN, "forbidden\n").into_response();
    };
    if given.is_empty() || !bool::from(given.as_bytes().ct_eq(want.as_bytes())) {
        tracing::warn!("a Bitrix24 event with a wrong or missing application_token was refused");
        return (StatusCode::FORBIDDEN, "forbidden\n").into_response();
    }
    let saved = st.store.lock().inbox_add(
        "bitrix24",
        &text,
        Some("application/x-www-form-urlencoded"),
        st.clock.now(),
    );
    match saved {
        Ok(_) => {
            let _ = st.kick.try_send(());
            (StatusCode::OK, "ok\n").into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "a Bitrix24 event could not be stored");
            (StatusCode::SERVICE_UNAVAILABLE, "cannot store the event\n").into_response()
        }
    }
}

/// The inbound routes (empty when nothing is configured).
pub fn router(st: Inbound) -> Router {
    let mut r = Router::new();
    if st.unitalk_secret.is_some() {
        r = r.route("/unitalk/webhook/{secret}", post(unitalk_webhook));
    }
    if st.b24_events {
        r = r.route("/bitrix24/events", post(bitrix24_event));
    }
    r.with_state(st)
}
