//! The `[webhooks]` section: Unitalk's call webhooks and Bitrix24's telephony events.

use super::raw::RawWebhooks;
use super::validate::{secret_source, Validator};
use super::*;

impl Validator {
    /// Validates `[webhooks]` (problems are collected like every other section's).
    pub(super) fn webhooks(
        &mut self,
        w: &RawWebhooks,
        env: &Env,
        mode: Mode,
        b24_http: bool,
    ) -> WebhooksConfig {
        let unitalk_secret = match secret_source(
            env,
            ENV_UNITALK_WEBHOOK_SECRET,
            w.unitalk_secret_file.clone(),
            "unitalk_webhook_secret",
            w.unitalk_secret.clone(),
        ) {
            Ok(v) => v.filter(|k| !k.trim().is_empty()),
            Err(e) => {
                self.fail(
                    "webhooks.unitalk_secret_file",
                    e,
                    "point it at a readable file holding only the secret",
                );
                None
            }
        };
        if let Some(sec) = &unitalk_secret {
            if sec.len() < 24
                || !sec
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                self.fail(
                    "webhooks.unitalk_secret",
                    "must be at least 24 letters, digits, - or _ (it is the only credential of the webhook URL)",
                    "generate one: openssl rand -hex 24",
                );
            }
        }
        let bitrix24_events = w.bitrix24_events.unwrap_or(false);
        if bitrix24_events && mode != Mode::Telephony {
            self.fail(
                "webhooks.bitrix24_events",
                "click-to-call and callback events need the local application (telephony mode)",
                "set bitrix24.mode = \"telephony\" or turn the events off",
            );
        }
        let bitrix24_handler = match w.bitrix24_handler.clone() {
            Some(h) => match Url::parse(h.trim()) {
                Ok(u) if u.scheme() == "https" || (u.scheme() == "http" && b24_http) => Some(u),
                Ok(u)
                    if u.host_str()
                        .is_some_and(|h| h == "127.0.0.1" || h == "localhost") =>
                {
                    Some(u)
                }
                _ => {
                    self.fail(
                        "webhooks.bitrix24_handler",
                        format!("`{h}` is not an https:// address"),
                        "give the public HTTPS address of your reverse proxy's /bitrix24/events",
                    );
                    None
                }
            },
            None => None,
        };
        let bitrix24_offline = match w.bitrix24_route.as_deref() {
            None => w.bitrix24_handler.is_none(),
            Some("offline") => true,
            Some("online") => false,
            Some(other) => {
                self.fail(
                    "webhooks.bitrix24_route",
                    format!("`{other}` is not a route"),
                    "use \"online\" (Bitrix24 posts to bitrix24_handler) or \"offline\" (ubsync polls event.offline.get; needs an administrator's tokens)",
                );
                false
            }
        };
        if bitrix24_events && !bitrix24_offline && w.bitrix24_handler.is_none() {
            self.fail(
                "webhooks.bitrix24_handler",
                "missing: the online route needs a public address Bitrix24 posts the events to",
                "set it to https://<your reverse proxy>/bitrix24/events, or use bitrix24_route = \"offline\"",
            );
        }
        let click_ttl = self.duration(
            "webhooks.click_ttl",
            w.click_ttl.clone(),
            "10m",
            ("1m", "25m"),
        );
        WebhooksConfig {
            bitrix24_events,
            bitrix24_offline,
            bitrix24_handler,
            application_token: w
                .application_token
                .clone()
                .filter(|t| !t.trim().is_empty())
                .map(SecretString::from),
            click_ttl,
            callback_user_id: w.callback_user_id,
            unitalk_secret: unitalk_secret.map(SecretString::from),
            unitalk_id_field: w.unitalk_id_field.clone().unwrap_or_else(|| "dbid".into()),
            twin_slack_secs: self
                .duration(
                    "webhooks.twin_slack",
                    w.twin_slack.clone(),
                    "5s",
                    ("0s", "5m"),
                )
                .as_secs() as i64,
        }
    }
}
