//! Everything ubsync knows about talking to a Bitrix24 portal: the HTTP client and its auth
//! (incoming webhook or OAuth local application with single-flight refresh), the client-side rate
//! limiter every request passes through, the batch codec, and lenient decoding.
//!
//! The boundary error is [`Bitrix24Error`]; its variants say whether a retry can help
//! ([`Bitrix24Error::is_retryable`]) and whether a human must act ([`Bitrix24Error::needs_admin`]).

pub mod api;
pub mod batch;
mod client;
pub mod install;
pub mod limit;
pub mod redirect;
pub mod wire;

pub use client::{moved_fact_key, portal_key, Bitrix24Client, ClientStats, RATE_LIMIT_PATIENCE};

/// A value that must not print (a redirect's full `Location` may carry the webhook code).
#[derive(Clone)]
pub struct Hidden(pub String);

impl std::fmt::Debug for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Why a Bitrix24 request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Bitrix24Error {
    /// 503 `QUERY_LIMIT_EXCEEDED`: the portal's leaky bucket is full; slow down and retry.
    #[error("bitrix24 rate limit exceeded (503 QUERY_LIMIT_EXCEEDED)")]
    RateLimited,
    /// 429 `OPERATION_TIME_LIMIT`: this method used up its time budget; retry after `reset_at`.
    #[error(
        "bitrix24 method {method} is over its operating-time budget (429 OPERATION_TIME_LIMIT)"
    )]
    OperationLimit {
        method: String,
        reset_at: Option<i64>,
    },
    /// Credentials or permissions are wrong; retrying cannot help, an admin must act.
    #[error("bitrix24 refused authorization ({code}: {description}); {hint}")]
    Auth {
        code: String,
        description: String,
        hint: String,
    },
    /// Telephony mode without stored OAuth tokens.
    #[error("no OAuth tokens stored for {portal}; install the local application (`ubsync auth serve`) or pipe a refresh token in: `ubsync auth set-refresh-token - < token.txt`")]
    NoTokens { portal: String },
    /// The portal rejected this request; retrying the same request cannot help.
    #[error("bitrix24 {method} failed with HTTP {status}: {code}: {description}")]
    Api {
        method: String,
        status: u16,
        code: String,
        description: String,
    },
    /// 5xx, HTML, a timeout or a dropped connection. `outcome_unknown` is true when the request
    /// was sent and the portal may have executed it.
    #[error("bitrix24 temporarily unavailable: {detail}")]
    Unavailable {
        detail: String,
        outcome_unknown: bool,
    },
    /// The configured address does not lead to a Bitrix24 portal (the name does not resolve, TLS
    /// fails, another server answers): an admin must fix the configuration.
    #[error("bitrix24 cannot be reached as configured: {detail}")]
    Misconfigured {
        detail: String,
        outcome_unknown: bool,
    },
    /// The portal answered a redirect; followed inside the client when the policy allows it.
    #[error("bitrix24 answered HTTP {status} ({})", redirect::status_words(*status))]
    Moved { status: u16, location: Hidden },
    /// A redirect ubsync will not follow: an admin must check the configured address.
    #[error("bitrix24 answered HTTP {status} ({words}) from {from} to {to}, which ubsync will not follow: {reason}; check bitrix24.portal_url / bitrix24.webhook_url (`ubsync auth forget-redirect` drops a remembered address)")]
    Redirect {
        status: u16,
        words: &'static str,
        from: String,
        to: String,
        reason: String,
    },
}

impl Bitrix24Error {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Bitrix24Error::RateLimited
                | Bitrix24Error::OperationLimit { .. }
                | Bitrix24Error::Unavailable { .. }
                | Bitrix24Error::Moved { .. }
        )
    }

    /// Whether a human must fix credentials, scopes or the plan before anything works.
    pub fn needs_admin(&self) -> bool {
        matches!(
            self,
            Bitrix24Error::Auth { .. }
                | Bitrix24Error::NoTokens { .. }
                | Bitrix24Error::Redirect { .. }
                | Bitrix24Error::Misconfigured { .. }
        )
    }

    /// Whether the request may have been executed although no answer arrived.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            Bitrix24Error::Unavailable {
                outcome_unknown: true,
                ..
            } | Bitrix24Error::Misconfigured {
                outcome_unknown: true,
                ..
            }
        )
    }
}

/// What an admin should do about an authorization error code.
pub fn auth_hint(code: &str) -> Option<&'static str> {
    Some(match code {
        "NO_AUTH_FOUND" | "wrong_client" => "check the webhook URL or reinstall the local application; the code or token is not valid",
        "WRONG_AUTH_TYPE" => "telephony methods need an OAuth local application, not an incoming webhook: set bitrix24.mode = \"activity\" or configure client_id/client_secret",
        "insufficient_scope" | "invalid_scope" => "add the scopes telephony, crm, task, user_basic and im to the application or webhook in Developer resources",
        "invalid_grant" => "the refresh token is no longer valid: reinstall the local application or run `ubsync auth set-refresh-token` with a new one",
        "invalid_client" => "client_id or client_secret is wrong, or the application is not installed on this portal",
        "PAYMENT_REQUIRED" => "the application's subscription or the portal's plan has expired: renew it in the portal",
        "ACCESS_DENIED" => "REST is available only on commercial plans, or the user lacks rights: check the portal plan and the user's permissions",
        "INVALID_CREDENTIALS" => "the webhook's or application's user lacks rights for this method: grant them in the portal",
        "user_access_error" => "the application is restricted to certain users: allow this user in the application settings",
        "METHOD_CONFIRM_WAITING" => "an administrator must confirm this method for the application",
        "OVERLOAD_LIMIT" => "Bitrix24 blocked REST for this portal due to overload: contact Bitrix24 support",
        "PORTAL_DELETED" => "the portal is deleted or closed",
        _ => return None,
    })
}
