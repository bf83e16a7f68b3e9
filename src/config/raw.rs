//! The configuration file as read: every key optional, validated by `validate.rs`.

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) unitalk: RawUnitalk,
    #[serde(default)]
    pub(super) bitrix24: RawBitrix24,
    #[serde(default)]
    pub(super) state: RawState,
    #[serde(default)]
    pub(super) sync: RawSync,
    #[serde(default)]
    pub(super) activity: RawActivity,
    #[serde(default)]
    pub(super) tasks: RawTasks,
    #[serde(default)]
    pub(super) schedule: RawSchedule,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) http: RawHttp,
    #[serde(default)]
    pub(super) recordings: RawRecordings,
    #[serde(default)]
    pub(super) rules: super::rules::RawRules,
    #[serde(default)]
    pub(super) webhooks: RawWebhooks,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawWebhooks {
    pub(super) unitalk_secret: Option<String>,
    pub(super) unitalk_secret_file: Option<String>,
    pub(super) unitalk_id_field: Option<String>,
    pub(super) twin_slack: Option<String>,
    pub(super) bitrix24_events: Option<bool>,
    pub(super) bitrix24_route: Option<String>,
    pub(super) bitrix24_handler: Option<String>,
    pub(super) application_token: Option<String>,
    pub(super) click_ttl: Option<String>,
    pub(super) callback_user_id: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawRecordings {
    pub(super) delivery: Option<String>,
    pub(super) max_megabytes: Option<i64>,
    pub(super) send_api_key: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawHttp {
    pub(super) install: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawSchedule {
    pub(super) file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawHealth {
    pub(super) max_age: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawUnitalk {
    pub(super) base_url: Option<String>,
    pub(super) api_key: Option<String>,
    pub(super) api_key_file: Option<String>,
    pub(super) timezone: Option<String>,
    pub(super) request_timeout: Option<String>,
    pub(super) page_size: Option<i64>,
    pub(super) retry_base_delay: Option<String>,
    pub(super) allow_insecure_http: Option<bool>,
    pub(super) call_id_field: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawBitrix24 {
    pub(super) mode: Option<String>,
    pub(super) portal_url: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_file: Option<String>,
    pub(super) oauth_url: Option<String>,
    pub(super) webhook_url: Option<String>,
    pub(super) webhook_url_file: Option<String>,
    pub(super) burst: Option<i64>,
    pub(super) per_second: Option<i64>,
    pub(super) max_per_10s: Option<i64>,
    pub(super) default_user_id: Option<i64>,
    pub(super) request_timeout: Option<String>,
    pub(super) retry_base_delay: Option<String>,
    pub(super) operating_limit: Option<i64>,
    pub(super) timezone: Option<String>,
    pub(super) allow_insecure_http: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawState {
    pub(super) path: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawSync {
    pub(super) start: Option<String>,
    pub(super) lookback: Option<String>,
    pub(super) settle: Option<String>,
    pub(super) max_window: Option<String>,
    pub(super) default_country: Option<String>,
    pub(super) skip_internal: Option<bool>,
    pub(super) crm_create: Option<bool>,
    pub(super) add_to_chat: Option<bool>,
    pub(super) recording_wait: Option<String>,
    pub(super) max_call_duration: Option<String>,
    pub(super) sweep_every: Option<String>,
    pub(super) stage_limit: Option<i64>,
    pub(super) recording_repulls: Option<i64>,
    pub(super) max_consecutive_failures: Option<i64>,
    pub(super) crm_cache: Option<String>,
    pub(super) record_url_on_finish: Option<bool>,
    pub(super) record_check_after: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawActivity {
    pub(super) create_leads: Option<bool>,
    pub(super) lead_title: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
pub(super) struct RawTasks {
    pub(super) enabled: Option<bool>,
    pub(super) title: Option<String>,
    pub(super) description: Option<String>,
    pub(super) deadline_minutes: Option<i64>,
    pub(super) one_per_client: Option<bool>,
    pub(super) close_on_callback: Option<bool>,
}
