//! ubsync keeps Bitrix24 CRM in step with the Unitalk cloud PBX.
//!
//! See `ARCHITECTURE.md` for the bird's-eye view and the codemap.

pub mod bitrix24;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod inbound;
pub mod lock;
pub mod netdiag;
pub mod phpquery;
pub mod recording;
pub mod redact;
pub mod rules;
pub mod schedule;
pub mod sim;
pub mod store;
pub mod sync;
pub mod table;
pub mod timezone;
pub mod unitalk;
