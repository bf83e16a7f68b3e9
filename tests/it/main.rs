//! The integration test binary: real HTTP against the simulators, and the real `ubsync` binary.

// Tests call the simulators and the daemon directly, as an upstream or an admin would.
#![allow(clippy::disallowed_methods)]

mod harness;

mod business_rules;
mod certainty;
mod chaos;
mod cli_check;
mod cli_errors;
mod cli_sync;
mod clicks;
mod config_validation;
mod faults;
mod limits;
mod official_client;
mod old_history;
mod pipeline;
mod pipeline_v2;
mod properties;
mod record_check;
mod recordings;
mod reports;
mod rules;
mod security;
mod sim_bitrix24;
mod sim_unitalk;
mod unitalk_paging;
mod webhooks;
