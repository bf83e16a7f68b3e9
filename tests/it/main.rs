//! The integration test binary: real HTTP against the simulators, and the real `ubsync` binary.

mod harness;

mod cli_check;
mod config_validation;
mod official_client;
mod sim_bitrix24;
mod sim_unitalk;
